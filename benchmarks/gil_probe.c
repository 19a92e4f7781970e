/* The GIL's holder, sampled from outside the interpreter (benchmarks/gil_probe.py builds and
 * loads this). gil_sample runs in a thread of its own that has let the GIL go (a ctypes.CDLL
 * call), so it sees the GIL taken and let go without taking part. It asks for SCHED_FIFO: a
 * sampler scheduled like the threads it watches runs least when they run most, and counts
 * them low (on 2 busy cores, a thread holding the GIL 33% of the time got 20% of the
 * samples). Only reads: the interpreter's state is never written. */
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>

#define SLOTS 512
#define MARKS 64

static volatile int stop_flag;
static void *volatile marked[MARKS]; /* thread states now in the benchmark's stand-in */
uint64_t gil_keys[SLOTS];            /* holder (a PyThreadState address, | 1 in the stand-in) */
int64_t gil_counts[SLOTS];           /* samples for each; key 0: the GIL was free */
int64_t gil_unfiled;                 /* held, more holders than slots */

void gil_mark(int slot, void *tstate) {
    if (slot >= 0 && slot < MARKS) marked[slot] = tstate;
}

void gil_stop(void) { stop_flag = 1; }

static void file(uint64_t key) {
    uint64_t at = (key >> 4) % SLOTS;
    for (int tries = 0; tries < SLOTS; tries++, at = (at + 1) % SLOTS) {
        if (gil_counts[at] == 0) gil_keys[at] = key;
        if (gil_keys[at] == key) {
            gil_counts[at]++;
            return;
        }
    }
    gil_unfiled++;
}

/* Samples every period_ns until gil_stop; returns the samples taken. *fifo: 0 when
 * SCHED_FIFO was granted, else the error (the samples are then biased, as above). */
int64_t gil_sample(const volatile int *locked, void *const volatile *holder, long period_ns,
                   int *fifo) {
    struct sched_param param = {.sched_priority = 1};
    struct timespec pause = {0, period_ns};
    int64_t taken = 0;
    *fifo = pthread_setschedparam(pthread_self(), SCHED_FIFO, &param);
    for (int k = 0; k < SLOTS; k++) gil_keys[k] = 0, gil_counts[k] = 0;
    gil_unfiled = 0;
    stop_flag = 0;
    while (!stop_flag) {
        uint64_t key = 0;
        if (*locked) {
            key = (uint64_t)(uintptr_t)*holder;
            for (int k = 0; k < MARKS; k++) {
                if (marked[k] && (uint64_t)(uintptr_t)marked[k] == key) {
                    key |= 1;
                    break;
                }
            }
        }
        file(key);
        taken++;
        nanosleep(&pause, 0);
    }
    param.sched_priority = 0;
    pthread_setschedparam(pthread_self(), SCHED_OTHER, &param);
    return taken;
}

/* One int read: through ctypes.PyDLL (the GIL held) or ctypes.CDLL (let go), to check that
 * `locked` is the GIL's own flag before trusting it. */
int gil_read(const volatile int *flag) { return *flag; }
