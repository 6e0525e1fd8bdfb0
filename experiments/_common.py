"""What every experiment shares: scales, data sets, training, results and figures.

An experiment module defines `NAME`, `DESCRIPTION` (one line), `CLAIM` (the claim of
docs/theory.md sec. 5 it checks), `CONFIGS` (one frozen dataclass per scale:
`"tiny"` for tests, `"small"` for a 2-core CPU, `"large"` for an accelerator),
`run(config, seed) -> Outcome`, `plot(record, path)` and `plan(config)` (what
`run` trains, for `--dry-run`: see `experiments._dry_run`). `execute` times `run`, adds
what is needed to reproduce it (command, seeds, configuration, JAX backend) and
writes `results.json` and `figure.png` into the output folder.

Everything here is float32 and independent of `jax_enable_x64`: data are float32
NumPy arrays and every model is built with `dtype=jnp.float32`.
"""

import dataclasses
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from flowjax._training import evaluate, fit


SCALES = ("tiny", "small", "large")
DTYPE = jnp.float32
EXPERIMENTS_DIR = Path(__file__).resolve().parent
RESULTS_DIR = EXPERIMENTS_DIR / "results"
JSON_NAME = "results.json"
FIGURE_NAME = "figure.png"
SMOKE_NOTE = (
    "tiny scale: a smoke run, the verdict is not meaningful; see "
    "experiments/README.md for the small-scale result"
)


# What an experiment returns


class Verdict(NamedTuple):
    """Whether the measurement supports the claim, by a criterion fixed in advance.

    `supports` is `True`, `False`, or `None` (mixed or inconclusive); `criterion`
    states the test applied to the numbers; `sentence` says what was measured.
    """

    supports: bool | None
    criterion: str
    sentence: str


class Outcome(NamedTuple):
    """The result of `run`: table rows (dicts with the keys of `columns`), a
    summary dict of derived figures, extra series for the figure, and the
    verdict."""

    columns: tuple[str, ...]
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    verdict: Verdict
    series: dict[str, Any] = {}


def seeds_of(seed: int, num_seeds: int) -> list[int]:
    """The seeds a multi-seed experiment runs: `seed, seed + 1, ...`."""
    return [seed + i for i in range(num_seeds)]


# Data sets (float32 features, int32 labels)


class Split(NamedTuple):
    """A train/test split: `X_*` float32 `(N, d)`, `y_*` int32 `(N,)`."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X_train, self.y_train

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X_test, self.y_test


def _split(make: Callable[[int, np.random.Generator], Any], n_train, n_test, seed):
    rng = np.random.default_rng(seed)
    X_train, y_train = make(n_train, rng)
    X_test, y_test = make(n_test, rng)
    return Split(
        X_train.astype(np.float32),
        y_train.astype(np.int32),
        X_test.astype(np.float32),
        y_test.astype(np.int32),
    )


def swap_halves(n_train: int, n_test: int, seed: int, margin: float = 0.1) -> Split:
    """Points uniform on `[-1, 1]^2` with `|x_1| >= margin`; label 1 where `x_1 < 0`.

    Read by the fixed output function `f(y) = (-y_1, y_1)` (logits), label 1 needs
    `y_1 > 0` at the end and label 0 needs `y_1 < 0`: every point must cross to the
    other half plane, the left half moving right and the right half moving left.
    """

    def make(num, rng):
        x1 = rng.uniform(margin, 1.0, num) * rng.choice([-1.0, 1.0], num)
        X = np.stack([x1, rng.uniform(-1.0, 1.0, num)], axis=1)
        return X, (x1 < 0).astype(np.int32)

    return _split(make, n_train, n_test, seed)


def spirals(
    n_train: int, n_test: int, seed: int, turns: float = 1.5, noise: float = 0.05
) -> Split:
    """Two interleaved spirals `r = 0.3 + 1.7 u`, angle `2 pi turns u + pi c`.

    `u ~ U(0, 1)`, class `c in {0, 1}`, Gaussian noise of standard deviation
    `noise`; the arms are `1.7 / (2 turns)` apart, so separating them takes a strong
    deformation of the plane.
    """

    def make(num, rng):
        c = rng.integers(0, 2, num)
        u = rng.uniform(0.0, 1.0, num)
        r = 0.3 + 1.7 * u
        angle = 2 * np.pi * turns * u + np.pi * c
        X = np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1)
        return X + noise * rng.standard_normal(X.shape), c

    return _split(make, n_train, n_test, seed)


def annuli(
    n_train: int, n_test: int, seed: int, r_inner: float = 1.0, ring=(1.5, 2.0)
) -> Split:
    """The concentric-annuli task: label 0 uniform on the disc `r <= r_inner`,
    label 1 uniform on the ring `ring[0] <= r <= ring[1]`, equal class sizes.

    In the plane the ring encloses the disc, so no homeomorphism of `R^2` followed
    by a linear readout separates them; one more dimension lets a flow lift the
    disc out of the plane.
    """

    def make(num, rng):
        c = rng.integers(0, 2, num)
        lo = np.where(c == 0, 0.0, ring[0] ** 2)
        hi = np.where(c == 0, r_inner**2, ring[1] ** 2)
        r = np.sqrt(rng.uniform(lo, hi))  # uniform in area
        angle = rng.uniform(0.0, 2 * np.pi, num)
        return np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1), c

    return _split(make, n_train, n_test, seed)


def digits(seed: int, test_fraction: float = 0.25) -> Split:
    """scikit-learn's bundled 8x8 digits, stratified split with `seed`, standardized
    with the training statistics (as `flowjax demo` does)."""
    from flowjax._demo import load_digits_split

    s = load_digits_split(seed, test_fraction)
    return Split(s.X_train, s.y_train, s.X_test, s.y_test)


def subsample(split: Split, per_class: int, seed: int) -> Split:
    """Keep `per_class` training examples of each class (the test set unchanged)."""
    rng = np.random.default_rng(seed)
    keep = np.concatenate(
        [
            rng.choice(np.flatnonzero(split.y_train == c), per_class, replace=False)
            for c in np.unique(split.y_train)
        ]
    )
    keep = np.sort(keep)
    return split._replace(X_train=split.X_train[keep], y_train=split.y_train[keep])


# Training with flowjax.fit


class Trained(NamedTuple):
    """A model trained by `train`, its `flowjax.History` and its figures."""

    model: Any
    history: Any
    train: dict[str, float]
    test: dict[str, float]
    seconds: float


def train(
    model: Any,
    split: Split,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    sets: tuple[str, ...] = ("train", "test"),
    **fit_options: Any,
) -> Trained:
    """Fit `model` with Adam by `flowjax.fit`, then evaluate it on `sets`.

    `fit_options` go to `fit` (`task`, `smoothness`, ...). The batch order is drawn
    from `seed`; the batch size is capped at the training set's size. A set not
    evaluated gets an empty dict.
    """
    start = time.perf_counter()
    batch_size = min(batch_size, len(split.y_train))
    result = fit(
        model,
        optax.adam(learning_rate),
        split.train,
        batch_size=batch_size,
        steps=steps,
        key=jr.key(seed),
        **fit_options,
    )
    task = fit_options.get("task")
    chunk = _evaluation_chunk(len(split.y_train), len(split.y_test))
    data = {"train": split.train, "test": split.test}
    metrics = {
        name: evaluate(result.model, data[name], task=task, batch_size=chunk)
        if name in sets
        else {}
        for name in ("train", "test")
    }
    seconds = time.perf_counter() - start
    return Trained(
        result.model, result.history, metrics["train"], metrics["test"], seconds
    )


def _evaluation_chunk(n_train: int, n_test: int) -> int | None:
    """A chunk size that divides both set sizes (so `evaluate` compiles once), or
    `None` (whole sets) when their common divisor is too small to be efficient."""
    chunk = math.gcd(n_train, n_test)
    while chunk > 2048 and chunk % 2 == 0:
        chunk //= 2
    return chunk if chunk >= 64 else None


def parameter_count(tree: Any) -> int:
    """The number of trained numbers: floating array entries, excluding arrays
    a model marks untrained in its `trainable_spec()`."""
    spec = getattr(tree, "trainable_spec", None)
    if spec is not None:
        tree = eqx.filter(tree, spec())
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return int(sum(leaf.size for leaf in leaves))


def smoothed(values: Sequence[float], window: int) -> np.ndarray:
    """The running mean of `values` over `window` steps (shorter at the start)."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return a
    cumulative = np.cumsum(np.insert(a, 0, 0.0))
    index = np.arange(1, a.size + 1)
    lo = np.maximum(index - window, 0)
    return (cumulative[index] - cumulative[lo]) / (index - lo)


def mean_and_spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    a = np.asarray(values, dtype=float)
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    return {
        "mean": float(a.mean()),
        "std": std,
        "min": float(a.min()),
        "max": float(a.max()),
    }


# Records, tables and files


def command(name: str, scale: str, seed: int) -> str:
    """The command that reproduces a run."""
    return f"python -m experiments.{name} --scale {scale} --seed {seed}"


def _environment() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "processes": jax.process_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return _jsonable(np.asarray(value).tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or inf
    return value


def execute(module: ModuleType, scale: str, seed: int, out: Path | None) -> dict:
    """Run `module` at `scale` with `seed`; write `results.json` and `figure.png`.

    `out` defaults to `experiments/results/<scale>/<name>`. Returns the record
    written to the JSON file. On several processes (`--distributed`) every
    process computes and only process 0 writes.
    """
    if scale not in module.CONFIGS:
        raise ValueError(
            f"experiment {module.NAME!r} has no scale {scale!r}; use one of "
            f"{tuple(module.CONFIGS)}."
        )
    config = module.CONFIGS[scale]
    folder = RESULTS_DIR / scale / module.NAME if out is None else Path(out)
    start = time.perf_counter()
    outcome: Outcome = module.run(config, seed)
    wall = time.perf_counter() - start
    record = _jsonable(
        {
            "experiment": module.NAME,
            "description": module.DESCRIPTION,
            "claim": module.CLAIM,
            "command": command(module.NAME, scale, seed),
            "scale": scale,
            "seed": seed,
            "config": dataclasses.asdict(config),
            "columns": list(outcome.columns),
            "rows": outcome.rows,
            "summary": outcome.summary,
            "series": outcome.series,
            "verdict": verdict_record(outcome.verdict, scale),
            "wall_time_s": round(wall, 2),
            "environment": _environment(),
            "files": {"json": JSON_NAME, "figure": FIGURE_NAME},
        }
    )
    if jax.process_index() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / JSON_NAME).write_text(json.dumps(record, indent=1) + "\n")
        module.plot(record, folder / FIGURE_NAME)
    return record


def verdict_record(verdict: Verdict, scale: str) -> dict[str, Any]:
    """The verdict as `results.json` holds it. At scale tiny it is marked a smoke
    run (`smoke_run: true` and `note`, `SMOKE_NOTE`); the computed `supports`,
    `criterion` and `sentence` are kept."""
    record: dict[str, Any] = verdict._asdict()
    if scale == "tiny":
        record.update(smoke_run=True, note=SMOKE_NOTE)
    return record


def format_value(value: Any) -> str:
    """A table cell: floats to 4 significant digits, `None` as `-`."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a plain text table with the given columns."""
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c)
        for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells
    ]
    return "\n".join(lines)


def report(record: Mapping[str, Any], out: Path | None) -> str:
    """What the command line prints after a run."""
    verdict = record["verdict"]
    supports = {True: "supported", False: "NOT supported", None: "inconclusive"}
    computed = f"{supports[verdict['supports']]}: {verdict['sentence']}"
    if verdict.get("smoke_run"):
        computed = (
            f"none ({verdict['note']})\n"
            f"computed at this scale, to check the code only: {computed}"
        )
    where = "" if out is None else f"\nwrote {out / JSON_NAME} and {out / FIGURE_NAME}"
    return (
        f"{record['experiment']} ({record['scale']}, seed {record['seed']}, "
        f"{record['wall_time_s']:.1f} s on {record['environment']['backend']})\n"
        f"claim: {record['claim']}\n"
        f"{format_table(record['columns'], record['rows'])}\n"
        f"verdict: {computed}\n"
        f"criterion: {verdict['criterion']}{where}"
    )


# Figures


def figure(ncols: int = 1, width: float = 6.0, height: float = 4.4):
    """A `matplotlib.figure.Figure` with `ncols` axes side by side (no pyplot, so
    no display or global state is involved)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def save(fig: Any, path: Path) -> None:
    """Write `fig` as a PNG."""
    fig.savefig(path, dpi=100)


def stderr(message: str) -> None:
    """Progress for a person watching (the table itself goes to stdout)."""
    print(message, file=sys.stderr, flush=True)
