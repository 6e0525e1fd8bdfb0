"""`python -m experiments.benchmarks [--tiny] [--out DIR] [--only 1,2,3,4]`."""

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import adaptive, euler, refining
from ._harness import (
    Row,
    TimingSettings,
    limited_threads,
    machine,
    markdown,
    update_readme,
    write_reports,
)


HERE = Path(__file__).resolve().parent
SECTIONS = ("1", "2", "3", "4")


@dataclasses.dataclass(frozen=True)
class Suite:
    """The sizes and timing settings of one configuration of the suite."""

    name: str
    euler: tuple[euler.EulerConfig, ...]
    adaptive: adaptive.AdaptiveConfig
    refine: refining.RefineConfig
    forward: refining.ForwardConfig
    timing: TimingSettings
    slow_timing: TimingSettings  # for calls of seconds (refine, adaptive solves)


FULL = Suite(
    "full",
    euler.FULL,
    adaptive.FULL,
    refining.FULL_REFINE,
    refining.FULL_FORWARD,
    TimingSettings(warmup=2, min_runs=5, max_runs=60, budget_s=1.0),
    TimingSettings(warmup=1, min_runs=3, max_runs=30, budget_s=3.0),
)
TINY = Suite(
    "tiny",
    euler.TINY,
    adaptive.TINY,
    refining.TINY_REFINE,
    refining.TINY_FORWARD,
    TimingSettings(warmup=1, min_runs=3, max_runs=5, budget_s=0.05),
    TimingSettings(warmup=1, min_runs=3, max_runs=3, budget_s=0.05),
)


def _log(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", file=sys.stderr)


def run_suite(
    suite: Suite, sections: Sequence[str], start: float, threads: int
) -> tuple[list[Row], dict[str, Any]]:
    """Run the selected sections; return the rows and the extra results."""
    rows: list[Row] = []
    extra: dict[str, Any] = {"summaries": {}, "section_wall_s": {}}
    for section in sections:
        begin = time.perf_counter()
        _log(f"section {section}", start)
        if section == "1":
            rows += euler.run(suite.euler, suite.timing)
        elif section == "2":
            if not adaptive.torch_available():
                extra["summaries"][adaptive.SECTION] = [
                    "Skipped: PyTorch/torchdiffeq not installed "
                    "(`pip install -e '.[bench]'`)."
                ]
            rows += adaptive.run(suite.adaptive, suite.slow_timing, threads)
        elif section == "3":
            new, exponents = refining.run_refine(suite.refine, suite.slow_timing)
            rows += new
            extra["exponents"] = exponents
            extra["summaries"][refining.SECTION_REFINE] = refining.exponent_lines(
                exponents
            )
        elif section == "4":
            new, storage = refining.run_forward(suite.forward, suite.timing)
            rows += new
            extra["storage"] = storage
            extra["summaries"][refining.SECTION_FORWARD] = refining.storage_lines(
                suite.forward, storage
            )
        extra["section_wall_s"][section] = time.perf_counter() - begin
    return rows, extra


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks", description=__doc__
    )
    parser.add_argument(
        "--tiny", action="store_true", help="tiny sizes: every benchmark in seconds"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: experiments/benchmarks/results, "
        "results/tiny with --tiny)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help="comma-separated sections to run (default: 1,2,3,4)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads of the BLAS/LAPACK/OpenMP pools and of PyTorch, for every "
        "side alike (default 1; 0 keeps the libraries' defaults)",
    )
    parser.add_argument(
        "--no-readme",
        action="store_true",
        help="do not rewrite the results block of experiments/benchmarks/README.md "
        "(only a full run of all sections rewrites it)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"unknown sections {unknown}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    suite = TINY if args.tiny else FULL
    out = args.out or (HERE / "results" / "tiny" if args.tiny else HERE / "results")
    start = time.perf_counter()
    meta = machine()
    with limited_threads(args.threads) as threads:
        rows, extra = run_suite(suite, sections, start, args.threads)
    meta.update(extra)
    meta["threads"] = threads
    meta["config"] = suite.name
    meta["sections"] = sections
    meta["timing"] = dataclasses.asdict(suite.timing)
    meta["slow_timing"] = dataclasses.asdict(suite.slow_timing)
    meta["wall_s"] = time.perf_counter() - start
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path, md_path = write_reports(out, meta, rows)
    table = markdown(meta, rows)
    print(table)
    if not (args.tiny or args.no_readme) and sections == list(SECTIONS):
        update_readme(HERE / "README.md", table)
    _log(f"wrote {json_path} and {md_path}", start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
