"""Timing, result rows, the machine description and the report files.

Every timed call blocks until its result is ready (`jax.block_until_ready`, or a
synchronous call for NumPy, SciPy and PyTorch on the CPU), so the same code times
CPU, GPU and TPU runs. The calls of one comparison run round-robin after warm-up
(A, B, A, B, ...), so a change of machine load hits both sides alike, and the
ratio of their medians is formed in the same run.
"""

import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax


# Timing


@dataclasses.dataclass(frozen=True)
class TimingSettings:
    """How many times a call runs.

    `warmup` untimed calls first; then rounds of all calls of a comparison until
    `budget_s` seconds of timed work, at least `min_runs` and at most `max_runs`
    rounds.
    """

    warmup: int = 2
    min_runs: int = 5
    max_runs: int = 50
    budget_s: float = 1.0


@dataclasses.dataclass(frozen=True)
class Measurement:
    """The median wall time of `runs` timed calls, and the fastest, in seconds."""

    median_s: float
    runs: int
    min_s: float = math.nan


def compile_jax(fn: Callable[..., Any], *args: Any) -> tuple[Callable[..., Any], float]:
    """`jax.jit(fn)` lowered and compiled for `args`: the executable and seconds."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def blocking(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """A call of `fn(*args)` that returns only when its result is ready."""
    return lambda: jax.block_until_ready(fn(*args))


def _seconds(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def time_calls(
    calls: Sequence[Callable[[], Any]],
    settings: TimingSettings,
    warm: Sequence[bool] | None = None,
) -> list[Measurement]:
    """Median wall time of each blocking call, the calls run round-robin.

    `settings.warmup` untimed rounds first, skipping the calls whose `warm` flag
    is false (a SciPy or PyTorch call has nothing to compile). The number of
    timed rounds comes from the first timed round: as many as fit in
    `settings.budget_s`, clipped to `[min_runs, max_runs]`. Round `r` starts at
    call `r mod len(calls)`, so no call always runs first.
    """
    warm = [True] * len(calls) if warm is None else list(warm)
    for _ in range(settings.warmup):
        for call, flag in zip(calls, warm, strict=True):
            if flag:
                call()
    times: list[list[float]] = [[] for _ in calls]
    _timed_round(calls, times, 0)
    per_round = max(sum(t[0] for t in times), 1e-9)
    runs = int(settings.budget_s / per_round)
    runs = min(max(runs, settings.min_runs), settings.max_runs)
    for r in range(1, runs):
        _timed_round(calls, times, r)
    return [Measurement(statistics.median(t), runs, min(t)) for t in times]


def _timed_round(
    calls: Sequence[Callable[[], Any]], times: list[list[float]], r: int
) -> None:
    for i in range(len(calls)):
        j = (r + i) % len(calls)
        times[j].append(_seconds(calls[j]))


# Result rows


@dataclasses.dataclass
class Row:
    """One comparison: this library's side against the other side, same work.

    `ratio = flowjax_s / other_s` of the medians (lower is better for this
    library); `min_ratio` is the same quotient of the fastest runs, which a
    loaded machine disturbs less. `status` is `"PASS"`/`"MISS"` for `ratio`
    against `target` (an upper bound) or `"-"` where no target applies. `extra`
    holds machine-readable figures (GFLOP/s, function evaluations, errors).
    """

    section: str
    benchmark: str
    flowjax: str
    other: str
    shapes: str
    flowjax_s: float
    other_s: float
    ratio: float
    runs: int
    target: float | None
    status: str
    min_ratio: float = math.nan
    flowjax_compile_s: float | None = None
    other_compile_s: float | None = None
    notes: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


def status_of(ratio: float, target: float | None) -> str:
    """`"PASS"` if `ratio <= target`, `"MISS"` if not, `"-"` without a target."""
    if target is None:
        return "-"
    return "PASS" if ratio <= target else "MISS"


def make_row(
    section: str,
    benchmark: str,
    sides: tuple[str, str],
    shapes: str,
    times: tuple[Measurement, Measurement],
    *,
    target: float | None = None,
    compile_s: tuple[float | None, float | None] = (None, None),
    notes: str = "",
    extra: dict[str, Any] | None = None,
) -> Row:
    """A row from the two sides' measurements; the ratio is formed here."""
    ours, theirs = times
    ratio = ours.median_s / theirs.median_s
    return Row(
        section=section,
        benchmark=benchmark,
        flowjax=sides[0],
        other=sides[1],
        shapes=shapes,
        flowjax_s=ours.median_s,
        other_s=theirs.median_s,
        ratio=ratio,
        runs=min(ours.runs, theirs.runs),
        target=target,
        status=status_of(ratio, target),
        min_ratio=ours.min_s / theirs.min_s,
        flowjax_compile_s=compile_s[0],
        other_compile_s=compile_s[1],
        notes=notes,
        extra={} if extra is None else extra,
    )


def fitted_exponent(sizes: Sequence[float], seconds: Sequence[float]) -> float:
    """The slope `p` of the least-squares line `log t = p log w + c`."""
    xs = [math.log(w) for w in sizes]
    ys = [math.log(t) for t in seconds]
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    num = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True))
    den = sum((x - x_mean) ** 2 for x in xs)
    return num / den


# Threads


@contextlib.contextmanager
def limited_threads(threads: int) -> Iterator[str]:
    """Limit the BLAS and OpenMP pools (NumPy, SciPy, jaxlib's LAPACK, PyTorch's
    OpenMP) to `threads` while inside; `0` keeps the libraries' defaults.

    Yields a description for the report. On a shared machine the default pools
    spin-wait for cores others hold (measured here: the SciPy pipeline and
    PyTorch's solves ran 10 to 30 times slower with 2 threads than with 1).
    """
    if threads <= 0:
        yield "library defaults"
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield "library defaults (threadpoolctl not installed)"
        return
    with threadpool_limits(limits=threads):
        yield f"{threads} (BLAS, LAPACK and OpenMP pools; PyTorch intra-op)"


# The machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


PACKAGES = ("jax", "jaxlib", "equinox", "diffrax", "numpy", "scipy", "torch")


def machine() -> dict[str, Any]:
    """The date, CPU model, core count, load average, devices and versions."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in (*PACKAGES, "torchdiffeq")},
    }


# Reports


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    value = seconds * 1e3
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2g}"


def _target(target: float | None) -> str:
    return "-" if target is None else f"<= {target:g}"


_HEADER = (
    "| flowjax side | other side | shapes | runs | flowjax ms | other ms | ratio "
    "| target | status | min ratio | compile s (flowjax / other) | notes |\n"
    "|---|---|---|---:|---:|---:|---:|---|---|---:|---|---|\n"
)


def _table_line(row: Row) -> str:
    compile_s = f"{_s(row.flowjax_compile_s)} / {_s(row.other_compile_s)}"
    cells = [
        row.flowjax,
        row.other,
        row.shapes,
        str(row.runs),
        _ms(row.flowjax_s),
        _ms(row.other_s),
        f"{row.ratio:.3g}",
        _target(row.target),
        f"**{row.status}**" if row.status == "MISS" else row.status,
        f"{row.min_ratio:.3g}",
        compile_s,
        row.notes,
    ]
    return "| " + " | ".join(cells) + " |\n"


def markdown(meta: dict[str, Any], rows: Sequence[Row]) -> str:
    """The results as Markdown: the machine, then one table a section."""
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    text = (
        f"Run {meta['date']} ({meta['config']} configuration, "
        f"{meta['wall_s']:.0f} s): {meta['cpu']}, {meta['cores']} cores, "
        f"backend {meta['backend']}; load average "
        f"{meta['load_average_start'][0]} at the start, "
        f"{meta['load_average_end'][0]} at the end (1-minute). {versions}.\n"
        f"Threads: {meta.get('threads', 'library defaults')}. Times are medians "
        "of `runs` timed calls after warm-up; ratio = flowjax / other (lower is "
        "better for flowjax), min ratio = the same for the fastest runs.\n"
    )
    for section in dict.fromkeys(row.section for row in rows):
        text += f"\n### {section}\n\n" + _HEADER
        text += "".join(_table_line(r) for r in rows if r.section == section)
        for line in meta.get("summaries", {}).get(section, []):
            text += f"\n{line}\n"
    return text


def write_reports(
    out: Path, meta: dict[str, Any], rows: Sequence[Row]
) -> tuple[Path, Path]:
    """Write `results.json` and `results.md` into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    payload = {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}
    json_path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    md_path.write_text(markdown(meta, rows))
    return json_path, md_path


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


README_START = "<!-- results:start -->"
README_END = "<!-- results:end -->"


def update_readme(readme: Path, table: str) -> None:
    """Replace the text between the results markers of `readme` with `table`."""
    text = readme.read_text()
    head, start, rest = text.partition(README_START)
    _, end, tail = rest.partition(README_END)
    if not start or not end:
        raise ValueError(
            f"{readme} has no '{README_START}' ... '{README_END}' block to update"
        )
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")
