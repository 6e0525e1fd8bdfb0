"""`flowjax demo`: a plain net on real digits, its flow model, its ResNet refinements.

The steps, each a function below:

1. load scikit-learn's bundled handwritten digits (1,797 8x8 images, no download),
   split them with a fixed seed and standardize them;
2. train a plain `eqx.nn.MLP` with optax (Adam) and measure its test accuracy;
3. predict by solving the transport equation, `u(x, 0) = f(Phi_{0 -> T}(x))`
   (eq. 6), with the adaptive flow model, and compare with the plain net;
4. refine the net with `flowjax.refine` for a range of `num_steps` and both linear
   options, and measure each ResNet on the test set;
5. write the table (JSON and CSV), a log-log plot of the error against `num_steps`
   and a picture of a small net's flow carrying scikit-learn's two moons.

scikit-learn, matplotlib and tqdm (the `demo` extra) are imported only here, inside
the functions that need them.
"""

import contextlib
import csv
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax

from ._certificate import ROUNDING_ULPS, fitted_order, parameter_count
from ._flow_model import flow_model
from ._refine import refine
from ._serialise import save_mlp
from ._transport import Integrator


DTYPE = jnp.float32
ACTIVATIONS: dict[str, Callable[[Any], Any]] = {"relu": jax.nn.relu, "tanh": jnp.tanh}
LINEAR_OPTIONS = ("whole", "flow")
TABLE_COLUMNS = (
    "model",
    "linear",
    "num_steps",
    "depth",
    "depth_unit",
    "parameters",
    "test_accuracy",
    "agreement",
    "max_abs_logit_diff",
    "forward_ms",
)
FILES = {
    "json": "table.json",
    "csv": "table.csv",
    "convergence": "error_vs_num_steps.png",
    "moons": "moons_flow.png",
    "model": "digits_mlp.fjx",
    "inputs": "digits_test_inputs.npy",
}
VARIANT_NUM_STEPS = 8
# What `depth` counts: the plain net's layers, the refined ResNets' residual blocks.
PLAIN_DEPTH_UNIT, REFINED_DEPTH_UNIT = "layers", "residual blocks"
MOONS_DESCRIPTION = (
    "a net trained on two moons (widths), its accuracy, and flow_dimension: the "
    "ambient dimension n of its flow (the states move in R^n)"
)
# Tolerances of the adaptive solves. On the demo's float32 net, rtol 1e-5 leaves logit
# errors near 1e-2 and rtol 1e-6 near 4e-4, for 1.8 times the steps.
FLOW_RTOL, FLOW_ATOL = 1e-6, 1e-8


class Settings(NamedTuple):
    """How much work the demo does (the defaults, or `--quick` for tests)."""

    width: int
    depth: int
    epochs: int
    num_steps: tuple[int, ...]
    flow_inputs: (
        int | None
    )  # inputs for the adaptive flow model; None: the whole test set
    flow_chunk: int
    timing_repeats: int
    moons_samples: int
    moons_epochs: int
    points_per_stage: int


DEFAULT = Settings(
    width=64,
    depth=2,
    epochs=60,
    num_steps=(1, 2, 4, 8, 16, 32, 64),
    flow_inputs=None,
    flow_chunk=75,
    timing_repeats=9,
    moons_samples=160,
    moons_epochs=400,
    points_per_stage=12,
)
QUICK = Settings(
    width=16,
    depth=1,
    epochs=8,
    num_steps=(1, 2, 4),
    flow_inputs=16,
    flow_chunk=16,
    timing_repeats=1,
    moons_samples=40,
    moons_epochs=40,
    points_per_stage=4,
)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's options: output folder, seed, activation and `--quick`."""

    out: Path = Path("flowjax-out")
    seed: int = 0
    activation: str = "relu"
    quick: bool = False

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is not offered by the demo; choose "
                f"one of {sorted(ACTIVATIONS)}."
            )

    @property
    def settings(self) -> Settings:
        return QUICK if self.quick else DEFAULT


class Split(NamedTuple):
    """Standardized train/test split: float32 features `(N, 64)`, int32 labels."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


# 1. Data


def load_digits_split(seed: int, test_fraction: float = 0.25) -> Split:
    """scikit-learn's bundled digits, split with `seed` (stratified), standardized
    with the training set's mean and standard deviation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return _standardized(X_train, y_train, X_test, y_test)


def _standardized(X_train, y_train, X_test, y_test) -> Split:
    mean = X_train.mean(axis=0)
    std = X_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # pixels that are blank in every image
    return Split(
        ((X_train - mean) / std).astype(np.float32),
        y_train.astype(np.int32),
        ((X_test - mean) / std).astype(np.float32),
        y_test.astype(np.int32),
    )


# 2. Training


def train_mlp(
    X: np.ndarray,
    y: np.ndarray,
    *,
    width: int,
    depth: int,
    activation: str,
    epochs: int,
    key: jax.Array,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    progress: str | None = None,
) -> eqx.nn.MLP:
    """A float32 `eqx.nn.MLP` trained with Adam on softmax cross-entropy.

    `X` has shape `(N, d)`, `y` holds integer labels `0 .. C-1`. With `progress`
    (a label), a tqdm bar shows the epochs and the loss.
    """
    from tqdm.auto import tqdm

    model_key, data_key = jr.split(key)
    num_classes = int(y.max()) + 1
    mlp = eqx.nn.MLP(
        X.shape[1],
        num_classes,
        width,
        depth,
        activation=ACTIVATIONS[activation],
        dtype=DTYPE,
        key=model_key,
    )
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)
    epoch = _epoch_function(static, optimizer, min(batch_size, X.shape[0]))
    X_, y_ = jnp.asarray(X), jnp.asarray(y)
    bar = tqdm(range(epochs), desc=progress, disable=progress is None, leave=False)
    for index in bar:
        params, opt_state, loss = epoch(
            params, opt_state, X_, y_, jr.fold_in(data_key, index)
        )
        bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
    return eqx.combine(params, static)


def _epoch_function(static: Any, optimizer: optax.GradientTransformation, batch: int):
    def loss_fn(params, X, y):
        logits = jax.vmap(eqx.combine(params, static))(X)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(carry, index):
        params, opt_state = carry
        X, y, perm = index
        loss, grads = jax.value_and_grad(loss_fn)(params, X[perm], y[perm])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def epoch(params, opt_state, X, y, key):
        num_batches = X.shape[0] // batch
        perm = jr.permutation(key, X.shape[0])[: num_batches * batch]
        perm = perm.reshape(num_batches, batch)
        scan_step = lambda carry, p: step(carry, (X, y, p))  # noqa: E731
        (params, opt_state), losses = jax.lax.scan(scan_step, (params, opt_state), perm)
        return params, opt_state, losses.mean()

    return epoch


def batched(model: Callable) -> Callable:
    """`model` mapped over a batch of inputs and compiled."""
    return eqx.filter_jit(eqx.filter_vmap(model))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """The fraction of rows of `logits` whose argmax is the label."""
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def forward_time(fn: Callable, X: Any, repeats: int, budget: float = 0.5) -> float:
    """Median wall time of `fn(X)` in seconds, after one warm-up (compile) call:
    `repeats` timed runs, fewer (at least 3) when they would take over `budget`
    seconds in all."""
    jax.block_until_ready(fn(X))
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget):
        start = time.perf_counter()
        jax.block_until_ready(fn(X))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# 3. Prediction by the transport equation


class FlowPrediction(NamedTuple):
    logits: np.ndarray  # (N, C)
    steps: np.ndarray  # (N,) solver steps per input, all stages and layers
    seconds: float


def flow_model_prediction(
    mlp: eqx.nn.MLP, X: np.ndarray, chunk: int, progress: str | None = None
) -> FlowPrediction:
    """`u(x, 0) = f(Phi_{0 -> T}(x))` for each row of `X` by the adaptive flow model
    (eq. 6), in chunks of `chunk` inputs (one compiled program, a progress bar)."""
    from tqdm.auto import tqdm

    controller = diffrax.PIDController(rtol=FLOW_RTOL, atol=FLOW_ATOL)
    model = flow_model(mlp, integrator=Integrator(stepsize_controller=controller))
    solve = batched(model.solve)
    start = time.perf_counter()
    logits, steps = [], []
    for begin in tqdm(
        range(0, X.shape[0], chunk),
        desc=progress,
        disable=progress is None,
        leave=False,
    ):
        part = X[begin : begin + chunk]
        padded = np.concatenate([part, np.repeat(part[-1:], chunk - len(part), axis=0)])
        out, num = solve(jnp.asarray(padded))
        logits.append(np.asarray(out)[: len(part)])
        steps.append(np.asarray(num)[: len(part)])
    return FlowPrediction(
        np.concatenate(logits), np.concatenate(steps), time.perf_counter() - start
    )


# 4. Refinements


def refine_row(
    mlp: eqx.nn.MLP,
    linear: str,  # "whole" or "flow"
    num_steps: int,
    split: Split,
    plain_logits: np.ndarray,
    repeats: int,
) -> dict[str, Any]:
    """One row of the table: the refined ResNet measured on the test set."""
    resnet = refine(mlp, num_steps, linear=linear)  # pyright: ignore[reportArgumentType]
    forward = batched(resnet)
    X = jnp.asarray(split.X_test)
    seconds = forward_time(forward, X, repeats)
    logits = np.asarray(forward(X))
    plain_labels = np.argmax(plain_logits, axis=-1)
    return {
        "linear": linear,
        "num_steps": num_steps,
        "depth": int(resnet.depth),
        "depth_unit": REFINED_DEPTH_UNIT,
        "parameters": parameter_count(resnet),
        "test_accuracy": accuracy(logits, split.y_test),
        "agreement": float(np.mean(np.argmax(logits, axis=-1) == plain_labels)),
        "max_abs_logit_diff": float(np.max(np.abs(logits - plain_logits))),
        "forward_ms": 1e3 * seconds,
    }


# 5. Files


def table_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the table, the plain net first, each with the keys
    `TABLE_COLUMNS`; `None` where a column does not apply to the plain net
    (`linear`, `num_steps`, and the comparisons with itself)."""
    plain = {k: None for k in TABLE_COLUMNS} | {
        k: record["plain"][k]
        for k in ("depth", "depth_unit", "parameters", "test_accuracy", "forward_ms")
    }
    rows = [plain | {"model": "plain MLP"}]
    for row in record["refine"]:
        rows.append(
            {k: row.get(k) for k in TABLE_COLUMNS}
            | {"model": f"refine {row['linear']}"}
        )
    return rows


def write_table(out: Path, record: dict[str, Any]) -> None:
    """The demo's record as JSON and its table (`table_rows`) as CSV, with an
    empty cell where the plain net has no value."""
    (out / FILES["json"]).write_text(json.dumps(record, indent=2) + "\n")
    with open(out / FILES["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        for row in table_rows(record):
            writer.writerow({k: _csv_value(row[k]) for k in TABLE_COLUMNS})


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value


def read_csv_table(path: Path) -> list[dict[str, Any]]:
    """The CSV rows with numbers parsed back and empty cells as `None` (for checks
    and for users)."""
    kinds = {"num_steps": int, "depth": int, "parameters": int}
    text = {"model", "linear", "depth_unit"}

    def parse(key: str, value: str) -> Any:
        if value == "":
            return None
        return value if key in text else kinds.get(key, float)(value)

    with open(path, newline="") as f:
        return [{k: parse(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_convergence(
    rows: Sequence[dict[str, Any]],
    rounding: float,
    path: Path,
    title: str,
    flow_model: tuple[float, str] | None = None,
) -> None:
    """Log-log plot of max |logit difference| against `num_steps`, per linear option,
    with an order-1 reference line and, if given, the adaptive flow model's error
    and its label. `rounding` is the level below which an error counts as
    rounding; zeros are drawn at `rounding / ROUNDING_ULPS` (one float32 epsilon)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    zero = rounding / ROUNDING_ULPS
    styles = {"whole": ("o-", "C0"), "flow": ("s-", "C1")}
    for linear in LINEAR_OPTIONS:
        part = [r for r in rows if r["linear"] == linear]
        if not part:
            continue
        K = np.array([r["num_steps"] for r in part])
        err = np.array([r["max_abs_logit_diff"] for r in part])
        marker, color = styles[linear]
        label = f"linear='{linear}'"
        if np.all(err == 0):
            label += " (exact: 0, drawn at eps·max|logit|)"
        elif np.all(err <= rounding):
            label += " (exact to rounding)"
        elif len(K) >= 2:
            tail = slice(-3, None) if len(K) >= 3 else slice(None)
            order = fitted_order(K[tail].tolist(), err[tail].tolist())
            label += f" (fitted order {order:.2f})"
        ax.loglog(K, np.maximum(err, zero), marker, color=color, label=label)
        if linear == "flow" and np.any(err > rounding):
            ref = err[-1] * K[-1] / K
            ax.loglog(K, ref, "k--", lw=1, label="order 1 reference, C / num_steps")
    if flow_model is not None:
        ax.axhline(flow_model[0], color="C2", lw=1.2, ls="-.", label=flow_model[1])
    ax.axhline(
        rounding, color="0.6", lw=1, ls=":", label="rounding level, 100 eps·max|logit|"
    )
    ax.set_xscale("log", base=2)
    steps = sorted({r["num_steps"] for r in rows})
    ax.set_xticks(steps, [str(k) for k in steps])
    ax.minorticks_off()
    ax.set_xlabel("num_steps (Euler steps per stage)")
    ax.set_ylabel("max |logit difference| to the plain net (test set)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=110)


# The two-moons picture


STAGE_NAMES = (
    "rotate by V",
    "stretch by Σ",
    "rotate by U",
    "translate by b",
    "activate σ",
)


class MoonsFlow(NamedTuple):
    labels: np.ndarray  # (N,)
    times: np.ndarray  # (S,) network times
    states: np.ndarray  # (N, S, n)
    points_per_stage: int
    num_layers: int
    n: int
    accuracy: float
    widths: tuple[int, ...]
    sigma_names: tuple[str, ...]  # each layer's activation


def moons_flow(activation: str, seed: int, settings: Settings) -> MoonsFlow:
    """Train a 2-2-2 plain net on two moons and sample its characteristics through
    the five stages of each layer (eq. 48-49)."""
    from sklearn.datasets import make_moons

    X, y = make_moons(n_samples=settings.moons_samples, noise=0.08, random_state=seed)
    X, y = np.asarray(X), np.asarray(y)
    X = ((X - X.mean(axis=0)) / X.std(axis=0)).astype(np.float32)
    mlp = train_mlp(
        X,
        y.astype(np.int32),
        width=2,
        depth=1,
        activation=activation,
        epochs=settings.moons_epochs,
        batch_size=32,
        learning_rate=2e-2,
        key=jr.key(seed + 1),
        progress="moons",
    )
    model = flow_model(mlp)
    pps = settings.points_per_stage
    times, states = batched(lambda x: model.trajectory(x, pps))(jnp.asarray(X))
    logits = np.asarray(batched(mlp)(jnp.asarray(X)))
    return MoonsFlow(
        labels=y,
        times=np.asarray(times[0]),
        states=np.asarray(states),
        points_per_stage=pps,
        num_layers=model.flow.num_layers,
        n=model.flow.n,
        accuracy=accuracy(logits, y),
        widths=(2, 2, 2),
        sigma_names=tuple(layer.sigma.name for layer in model.flow.layers),
    )


def moons_record(flow: MoonsFlow) -> dict[str, Any]:
    """What `table.json` keeps of the two-moons net, with a `description`."""
    return {
        "description": MOONS_DESCRIPTION,
        "widths": flow.widths,
        "flow_dimension": flow.n,
        "accuracy": flow.accuracy,
    }


def plot_moons(flow: MoonsFlow, path: Path, activation: str, dpi: int = 90) -> Any:
    """One panel per stage and layer: each point's path through that stage in the
    plane of the first two coordinates, with its start and end marked. At most 5
    ticks an axis, so that the labels stay apart. Returns the figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    L, pps = flow.num_layers, flow.points_per_stage
    fig = Figure(figsize=(15, 3.3 * L + 0.6), layout="constrained")
    axes = fig.subplots(L, 5, squeeze=False)
    colors = np.array(["C0", "C3"])[flow.labels]
    for layer in range(L):
        for stage in range(5):
            ax = axes[layer, stage]
            first = (layer * 5 + stage) * pps  # index of the stage's start state
            path_ = flow.states[:, first : first + pps + 1, :2]
            for points, color in zip(path_, colors, strict=True):
                ax.plot(points[:, 0], points[:, 1], color=color, lw=0.6, alpha=0.5)
            ax.scatter(
                *path_[:, 0].T, s=9, facecolors="none", edgecolors="0.45", lw=0.6
            )
            ax.scatter(*path_[:, -1].T, s=9, c=colors)
            t0, t1 = flow.times[first], flow.times[first + pps]
            name = STAGE_NAMES[stage]
            if stage == 4 and flow.sigma_names[layer] == "identity":
                name = "identity activation: no motion"
            ax.set_title(
                f"layer {layer + 1}: {name}\nt = {t0:.1f} to {t1:.1f}", fontsize=9
            )
            ax.set_xlabel("$y_1$")
            ax.set_ylabel("$y_2$")
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.yaxis.set_major_locator(MaxNLocator(5))
    _decision_line(axes[L - 1, 4])
    _moons_legend(fig, axes[0, 0])
    fig.suptitle(
        f"A {'-'.join(map(str, flow.widths))} {activation} net trained on two moons "
        f"(accuracy {100 * flow.accuracy:.0f}%), as a flow in R^{flow.n}: each point's "
        "path through the five stages of each layer (first two coordinates)",
        fontsize=11,
    )
    fig.savefig(path, dpi=dpi)
    return fig


def _decision_line(ax) -> None:
    lo = min(ax.get_xlim()[0], ax.get_ylim()[0])
    hi = max(ax.get_xlim()[1], ax.get_ylim()[1])
    x_lim, y_lim = ax.get_xlim(), ax.get_ylim()
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="logit 1 = logit 2")
    ax.set_xlim(x_lim)
    ax.set_ylim(y_lim)
    ax.legend(fontsize=7, loc="best")


def _moons_legend(fig, ax) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color="C0", lw=1, label="path, class 0"),
        Line2D([], [], color="C3", lw=1, label="path, class 1"),
        Line2D(
            [], [], ls="", marker="o", mfc="none", mec="0.45", label="start of stage"
        ),
        Line2D([], [], ls="", marker="o", color="0.2", label="end of stage"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=4, fontsize=9)
    del ax


# The whole demo


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run every step, write the files into `config.out`, print the table and a
    summary, and return the record that `table.json` holds."""
    start = time.perf_counter()
    settings = config.settings
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    key = jr.key(config.seed)
    seconds: dict[str, float] = {}

    with _timed(seconds, "train"):
        split = load_digits_split(config.seed)
        mlp, plain, plain_logits = _train_digits(config, settings, split, key)
        save_mlp(out / FILES["model"], mlp)
        np.save(out / FILES["inputs"], split.X_test)
    with _timed(seconds, "flow_model"):
        flow = _flow_step(mlp, split, plain_logits, settings)
    with _timed(seconds, "refine"):
        rows = _refine_step(mlp, split, plain_logits, settings)
    with _timed(seconds, "variant"):
        variant = _variant_step(config, settings, split, key)
    rounding = _rounding_level(plain_logits)
    widths = _widths(mlp)
    with _timed(seconds, "plots"):
        title = (
            f"Refinements of the {'-'.join(map(str, widths))} {config.activation} MLP"
        )
        subset = (
            "" if flow["inputs"] == len(split.y_test) else f", {flow['inputs']} inputs"
        )
        flow_label = f"adaptive flow model (rtol {FLOW_RTOL:g}{subset})"
        plot_convergence(
            rows,
            rounding,
            out / FILES["convergence"],
            title,
            (flow["max_abs_logit_diff"], flow_label),
        )
        moons = moons_flow(config.activation, config.seed, settings)
        plot_moons(moons, out / FILES["moons"], config.activation)

    record = {
        "config": {
            "seed": config.seed,
            "activation": config.activation,
            "quick": config.quick,
            "widths": widths,
            "epochs": settings.epochs,
            "train_size": len(split.y_train),
            "test_size": len(split.y_test),
            "dtype": "float32",
            "flow_rtol": FLOW_RTOL,
            "flow_atol": FLOW_ATOL,
        },
        "plain": plain,
        "flow_model": flow,
        "rounding_level": rounding,
        "refine": rows,
        "variant": variant,
        "moons": moons_record(moons),
        "phase_seconds": seconds,
        "seconds": time.perf_counter() - start,
    }
    write_table(out, record)
    print(format_table(record))
    print(format_summary(record, out))
    return record


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


def _train_digits(config: DemoConfig, settings: Settings, split: Split, key):
    start = time.perf_counter()
    mlp = train_mlp(
        split.X_train,
        split.y_train,
        width=settings.width,
        depth=settings.depth,
        activation=config.activation,
        epochs=settings.epochs,
        key=key,
        progress=f"training {config.activation} MLP",
    )
    train_seconds = time.perf_counter() - start
    forward = batched(mlp)
    logits = np.asarray(forward(jnp.asarray(split.X_test)))
    seconds = forward_time(forward, jnp.asarray(split.X_test), settings.timing_repeats)
    plain = {
        "test_accuracy": accuracy(logits, split.y_test),
        "train_accuracy": accuracy(
            np.asarray(forward(jnp.asarray(split.X_train))), split.y_train
        ),
        "depth": len(mlp.layers),
        "depth_unit": PLAIN_DEPTH_UNIT,
        "parameters": parameter_count(mlp),
        "forward_ms": 1e3 * seconds,
        "train_seconds": train_seconds,
    }
    return mlp, plain, logits


def _flow_step(mlp, split: Split, plain_logits, settings: Settings) -> dict[str, Any]:
    count = settings.flow_inputs or len(split.y_test)
    prediction = flow_model_prediction(
        mlp, split.X_test[:count], settings.flow_chunk, progress="flow model"
    )
    reference = plain_logits[:count]
    return {
        "inputs": count,
        "max_abs_logit_diff": float(np.max(np.abs(prediction.logits - reference))),
        "agreement": float(
            np.mean(prediction.logits.argmax(-1) == reference.argmax(-1))
        ),
        "test_accuracy": accuracy(prediction.logits, split.y_test[:count]),
        "steps_mean": float(prediction.steps.mean()),
        "steps_max": int(prediction.steps.max()),
        "seconds": prediction.seconds,
    }


def _refine_step(mlp, split: Split, plain_logits, settings: Settings) -> list[dict]:
    from tqdm.auto import tqdm

    jobs = [(lin, K) for lin in LINEAR_OPTIONS for K in settings.num_steps]
    return [
        refine_row(mlp, lin, K, split, plain_logits, settings.timing_repeats)
        for lin, K in tqdm(jobs, desc="refine", leave=False)
    ]


def _variant_step(
    config: DemoConfig, settings: Settings, split: Split, key: jax.Array
) -> dict[str, Any]:
    """The same net with the other activation: its test accuracy, and the largest
    logit difference of its `linear="whole"` refinement (exact blocks)."""
    activation = "tanh" if config.activation == "relu" else "relu"
    mlp = train_mlp(
        split.X_train,
        split.y_train,
        width=settings.width,
        depth=settings.depth,
        activation=activation,
        epochs=settings.epochs,
        key=key,
        progress=f"training {activation} MLP",
    )
    X = jnp.asarray(split.X_test)
    logits = np.asarray(batched(mlp)(X))
    K = VARIANT_NUM_STEPS
    refined = np.asarray(batched(refine(mlp, K, linear="whole"))(X))
    return {
        "activation": activation,
        "test_accuracy": accuracy(logits, split.y_test),
        "refine_num_steps": K,
        "refine_max_abs_logit_diff": float(np.max(np.abs(refined - logits))),
    }


def _rounding_level(logits: np.ndarray) -> float:
    """The float32 rounding level for logits of this size, as in the certificate:
    `ROUNDING_ULPS * eps * max(1, max |logit|)`."""
    scale = max(1.0, float(np.max(np.abs(logits))))
    return float(ROUNDING_ULPS * np.finfo(np.float32).eps * scale)


def _widths(mlp: eqx.nn.MLP) -> list[Any]:
    """Layer widths `[d_0, ..., d_L]` (an entry is `'scalar'` for a scalar size)."""
    return [mlp.layers[0].in_features] + [lin.out_features for lin in mlp.layers]


def format_table(record: dict[str, Any]) -> str:
    """The table (`table_rows`) as fixed-width text, the plain net first; `depth`
    says what it counts: the plain net's layers, the ResNets' residual blocks."""
    head = (
        f"{'model':<14}{'steps':>6}  {'depth':<11}{'params':>9}{'test acc':>10}"
        f"{'agree':>8}{'max|dlogit|':>13}{'ms/batch':>10}"
    )
    lines = [head, "-" * len(head)]
    for row in table_rows(record):
        unit = "layer" if row["depth_unit"] == PLAIN_DEPTH_UNIT else "block"
        depth = f"{row['depth']} {unit}" + ("s" if row["depth"] != 1 else "")
        steps = "" if row["num_steps"] is None else row["num_steps"]
        agree = "" if row["agreement"] is None else f"{100 * row['agreement']:.1f}%"
        diff = row["max_abs_logit_diff"]
        diff = "" if diff is None else f"{diff:.2e}"
        lines.append(
            f"{row['model']:<14}{steps:>6}  {depth:<11}{row['parameters']:>9}"
            f"{100 * row['test_accuracy']:>9.1f}%{agree:>8}{diff:>13}"
            f"{row['forward_ms']:>10.3f}"
        )
    lines.append(
        "(depth: the plain net's layers, the refined ResNets' residual blocks; "
        "steps: num_steps)"
    )
    return "\n".join(lines)


def format_summary(record: dict[str, Any], out: Path) -> str:
    """A one-screen summary: accuracy, flow model, refinements and the files."""
    config, plain, flow = record["config"], record["plain"], record["flow_model"]
    variant, moons = record["variant"], record["moons"]
    net = "-".join(map(str, config["widths"]))
    inputs = (
        f"first {flow['inputs']} of {config['test_size']} test inputs (a subset)"
        if flow["inputs"] < config["test_size"]
        else f"all {flow['inputs']} test inputs"
    )
    rows = [
        (
            f"plain {net} {config['activation']} MLP",
            f"test accuracy {_pct(plain['test_accuracy'])} "
            f"(trained in {plain['train_seconds']:.1f} s)",
        ),
        (
            f"same net with {variant['activation']}",
            f"test accuracy {_pct(variant['test_accuracy'])}; 'whole', "
            f"{variant['refine_num_steps']} steps: max |dlogit| "
            f"{variant['refine_max_abs_logit_diff']:.1e}",
        ),
        (
            f"flow model (rtol {config['flow_rtol']:g})",
            f"{inputs}: max |dlogit| {flow['max_abs_logit_diff']:.1e}",
        ),
        (
            "",
            f"labels agree {_pct(flow['agreement'])}; solver steps per input: "
            f"mean {flow['steps_mean']:.0f}, largest {flow['steps_max']}",
        ),
        *[_refine_summary(record, linear) for linear in LINEAR_OPTIONS],
        (
            "two moons",
            f"{'-'.join(map(str, moons['widths']))} {config['activation']} net, "
            f"accuracy {_pct(moons['accuracy'])}, a flow in "
            f"R^{moons['flow_dimension']}",
        ),
    ]
    model = FILES["model"]
    files = [
        (f"{FILES['json']}, {FILES['csv']}", "the table above (JSON: every number)"),
        (FILES["convergence"], "error against num_steps, log-log"),
        (FILES["moons"], "the two-moons net's flow, stage by stage"),
        (model, "the MLP, for: flowjax refine FILE --num-steps 16 --out r.fjx"),
        (FILES["inputs"], "its standardized test inputs, for --inputs"),
    ]
    mode = "quick" if config["quick"] else "full"
    lines = [
        "",
        f"flowjax demo ({mode}, seed {config['seed']}): scikit-learn digits, "
        f"{config['train_size']} train / {config['test_size']} test images",
        *[f"  {label:<26} {text}" for label, text in rows],
        f"files in {out.resolve()}:",
        *[f"  {label:<26} {text}" for label, text in files],
        f"total time {record['seconds']:.0f} s",
    ]
    return "\n".join(lines)


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def _refine_summary(record: dict[str, Any], linear: str) -> tuple[str, str]:
    rows = [r for r in record["refine"] if r["linear"] == linear]
    K = [r["num_steps"] for r in rows]
    err = [r["max_abs_logit_diff"] for r in rows]
    label = f"refine linear='{linear}'"
    if max(err) <= record["rounding_level"]:
        agree = min(r["agreement"] for r in rows)
        exact = "exact" if max(err) == 0 else "exact to rounding"
        return label, (
            f"{exact} at num_steps {K[0]}..{K[-1]}: max |dlogit| {max(err):.1e}; "
            f"agree {_pct(agree)}"
        )
    order = ""
    if len(K) >= 3 and min(err[-3:]) > 0:
        order = f", order {fitted_order(K[-3:], err[-3:]):.2f}"
    return label, (
        f"max |dlogit| {err[0]:.1e} at {K[0]} step, {err[-1]:.1e} at {K[-1]}{order}; "
        f"agree {_pct(rows[-1]['agreement'])}"
    )
