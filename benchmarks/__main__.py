"""`python -m benchmarks NAME [ARGS...]`: one entry point for the suite."""

from __future__ import annotations

import importlib
import sys

SUITE = {
    "bench": ("bench", "end to end: naive RapidOCR against the daemon (CPU, GPU), pages/s, F1"),
    "host-ceiling": ("host_ceiling", "the host side alone, the device replayed: core-ms a "
                                     "page, scaling over cores"),
    "intake": ("intake", "the watcher and intake: restarts over kept files, new drops a second"),
    "pdf-pages": ("pdf_pages", "pdfium in-process against worker processes, pages/s"),
    "rec-padding": ("rec_padding", "recognition widths: accuracy of padding and squeezing"),
    "rec-widths": ("rec_widths", "recognition width buckets: session runs and time"),
    "scale-out": ("scale_out", "several daemons on one PostgreSQL: receipts/s and rows a file"),
    "gpu-warmup": ("gpu_warmup", "GPU only: shape warm-up, session builds and first runs"),
    "startup": ("startup", "start to first stored page while a GPU's shapes warm (stand-in "
                           "session builds)"),
    "gpu-check": ("gpu_check", "the one device call on a lent GPU (--rehearse: here, on the "
                               "CPU): each stage's JSON as it ends"),
    "gpu-bundle": ("gpu_bundle", "what a lent GPU machine lacks, as parts to carry, and the "
                                 "plan of the calls"),
    "gil-probe": ("gil_probe", "the GIL sampler: calibration, or a daemon run under it"),
    "soak": ("soak", "the whole daemon for a long while: a producer, an operator, a kill -9"),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__.splitlines()[0])
        for name, (_, what) in SUITE.items():
            print(f"  {name:<13} {what}")
        return 0
    if argv[0] not in SUITE:
        print(f"no benchmark {argv[0]!r}; `python -m benchmarks` lists them", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{SUITE[argv[0]][0]}")
    sys.argv = [f"benchmarks {argv[0]}", *argv[1:]]
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
