"""Benchmarks of flowjax against the tools users would otherwise pick.

One command runs every comparison side by side on the machine at hand and writes
`results.json` and `results.md`:

    python -m experiments.benchmarks            # the full suite (<= 10 min, 2 cores)
    python -m experiments.benchmarks --tiny     # every benchmark in seconds

See `experiments/benchmarks/README.md` for what is compared, the targets and the
latest results.
"""
