"""The benchmark suite: throughput, accuracy and cost figures, each a module with a `main`
that prints its figures as JSON naming the machine. Run from the project's root:

    python -m benchmarks                  # the list
    python -m benchmarks NAME [ARGS...]   # one of them; NAME --help for its options

NOTES.md holds the current figures, each with the command that reproduces it;
tests/test_benchmarks.py runs every one on tiny input in CI so none can rot.
"""
