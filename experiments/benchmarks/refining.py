"""Sections 3 and 4: the cost of `flowjax.refine`, and refined against plain nets.

Section 3 times `refine(mlp, K, linear="flow")` (the part of refining that does
linear algebra: embedding, proper SVD, rotation logarithms, eq. 19-23) compiled
for a fixed shape, against a NumPy/SciPy pipeline doing the same linear algebra
per layer: zero-padding into `R^n`, `scipy.linalg.svd`, the determinant fixes of
a proper SVD, `lam = log s` (`-kappa` on null directions) and
`scipy.linalg.logm` of both rotations (real part). The nets are one square ReLU
layer `relu(W x + b)`, `W: (w, w)` (an `eqx.nn.Sequential`; the cost is per
layer, so deeper nets scale it by their number of layers), float32; `n = w + 1`,
as `refine` picks under `jit` for a square layer.

Section 4 times the forward pass of `refine(mlp, K, linear=...)` against the
plain MLP on the same batch, and reports storage tied against untied.
"""

import dataclasses
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import scipy.linalg

from flowjax._flow_params import DEFAULT_KAPPA
from flowjax._refine import RefinedNet, refine
from flowjax._resnet import LinearStage, StretchStage, storage_bytes

from ._harness import (
    Row,
    TimingSettings,
    blocking,
    compile_jax,
    fitted_exponent,
    make_row,
    time_calls,
)


SECTION_REFINE = "3. refine against a SciPy pipeline"
SECTION_FORWARD = "4. Refined against plain forward"
TARGET_REFINE = 1.0  # at TARGET_REFINE_WIDTH
TARGET_REFINE_WIDTH = 512
TARGET_WHOLE = 1.3


@dataclasses.dataclass(frozen=True)
class RefineConfig:
    """Widths `w` of the one-layer nets `relu(W x + b)`, `W: (w, w)`; `K` steps
    per stage; the exponent is fitted on the widths `>= fit_from`."""

    widths: tuple[int, ...]
    num_steps: int = 8
    fit_from: int = 128


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """MLPs `d -> w -> w -> d` (ReLU), batch `B`, steps per stage `steps`;
    `linear="whole"` at `widths_whole`, `linear="flow"` at `width_flow`."""

    d: int
    widths_whole: tuple[int, ...]
    width_flow: int
    B: int
    steps: tuple[int, ...]


FULL_REFINE = RefineConfig((64, 128, 256, 512, 1024))
TINY_REFINE = RefineConfig((4, 8), num_steps=2, fit_from=4)
FULL_FORWARD = ForwardConfig(64, (64, 512), 64, 256, (1, 8, 32, 128))
TINY_FORWARD = ForwardConfig(3, (5,), 5, 4, (1, 4))


def relu_layer(width: int, seed: int = 0) -> eqx.nn.Sequential:
    """One float32 layer `relu(W x + b)`, `W: (width, width)`."""
    linear = eqx.nn.Linear(width, width, dtype=jnp.float32, key=jr.key(seed))
    return eqx.nn.Sequential([linear, eqx.nn.Lambda(jax.nn.relu)])


# Section 3


def refine_arrays(num_steps: int, static: Any):
    """`arrays -> refine(net, num_steps, linear="flow")` for `jit`, where
    `(arrays, static)` is the partition of the plain net."""

    def fn(arrays):
        return refine(eqx.combine(arrays, static), num_steps, linear="flow")

    return fn


def refined_generators(refined: RefinedNet) -> list[tuple[Any, Any, Any]]:
    """`(Q, lam, P)` of each layer, read off the tied stages of a refinement
    with `linear="flow"` (rotate by `V = expm(Q)`, stretch, rotate by `U`)."""
    rotations = [s.G for s in refined.chain.stages if isinstance(s, LinearStage)]
    stretches = [s.lam for s in refined.chain.stages if isinstance(s, StretchStage)]
    return [
        (Q, lam, P)
        for (Q, P), lam in zip(
            zip(rotations[0::2], rotations[1::2], strict=True), stretches, strict=True
        )
    ]


def scipy_layer_generators(
    W: np.ndarray, b: np.ndarray, n: int, kappa: float = DEFAULT_KAPPA
) -> tuple[np.ndarray, ...]:
    """`(W_hat, b_hat, Q, lam, P)` of one layer with NumPy and SciPy (eq. 19-23).

    `W_hat = U diag(s) V` from `scipy.linalg.svd` of the zero-padded layer, with
    `det U = det V = 1` made by sign flips (a column of `U` at a zero singular
    value, or a pair `(u_j, v_j)`), `lam = log s` (`-kappa` where `s = 0`),
    `P = Re logm(U)`, `Q = Re logm(V)`.
    """
    m, d = W.shape
    W_hat = np.zeros((n, n), W.dtype)
    W_hat[:m, :d] = W
    b_hat = np.zeros(n, b.dtype)
    b_hat[:m] = b
    U, s, V = scipy.linalg.svd(W_hat)
    zero = s <= n * np.finfo(W.dtype).eps * s[0]
    det_U, det_V = np.linalg.det(U), np.linalg.det(V)
    if det_U * det_V < 0 and zero.any():
        U[:, np.flatnonzero(zero)[-1]] *= -1
        det_U = -det_U
    if det_U < 0 and det_V < 0:
        U[:, -1] *= -1
        V[-1, :] *= -1
    lam = np.where(zero, -kappa, np.log(np.where(zero, 1, s))).astype(W.dtype)
    with warnings.catch_warnings():
        # logm warns when its own error estimate exceeds 1000 eps(float64).
        warnings.simplefilter("ignore", RuntimeWarning)
        P, Q = np.real(scipy.linalg.logm(U)), np.real(scipy.linalg.logm(V))
    return W_hat, b_hat, Q.astype(W.dtype), lam, P.astype(W.dtype)


def scipy_pipeline(layers: list[tuple[np.ndarray, np.ndarray]], n: int) -> list:
    """`scipy_layer_generators` of every layer `(W, b)`."""
    return [scipy_layer_generators(W, b, n) for W, b in layers]


def _numpy_layers(net: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """`(W, b)` of each `eqx.nn.Linear` of an MLP or a Sequential, as NumPy."""
    return [
        (np.asarray(L.weight), np.asarray(L.bias))
        for L in net.layers
        if isinstance(L, eqx.nn.Linear)
    ]


def _reconstruction_error(Q: Any, lam: Any, P: Any, W_hat: Any) -> float:
    """`max |expm(P) diag(exp(lam)) expm(Q) - W_hat|` in float64."""
    P, Q = np.asarray(P, np.float64), np.asarray(Q, np.float64)
    lam = np.asarray(lam, np.float64)
    R = scipy.linalg.expm(P) @ np.diag(np.exp(lam)) @ scipy.linalg.expm(Q)
    return float(np.max(np.abs(R - np.asarray(W_hat, np.float64))))


def _reconstruction_errors(
    refined: RefinedNet, scipy_layers: list
) -> tuple[float, float]:
    """Worst error of `expm(P) diag(exp(lam)) expm(Q)` against the embedded
    layer `W_hat` over the layers (eq. 22): flowjax's and SciPy's."""
    ours = max(
        _reconstruction_error(Q, lam, P, layer[0])
        for (Q, lam, P), layer in zip(
            refined_generators(refined), scipy_layers, strict=True
        )
    )
    theirs = max(
        _reconstruction_error(Q, lam, P, W_hat) for W_hat, _, Q, lam, P in scipy_layers
    )
    return ours, theirs


def _refine_row(width: int, cfg: RefineConfig, timing: TimingSettings) -> Row:
    net = relu_layer(width)
    arrays, static = eqx.partition(net, eqx.is_array)
    compiled, compile_s = compile_jax(refine_arrays(cfg.num_steps, static), arrays)
    refined = compiled(arrays)
    n = refined.n
    layers = _numpy_layers(net)
    ours, theirs = time_calls(
        [blocking(compiled, arrays), lambda: scipy_pipeline(layers, n)],
        timing,
        warm=(True, width == min(cfg.widths)),
    )
    extra: dict[str, Any] = {"width": width, "n": n}
    notes = ""
    if width == min(cfg.widths):
        err_ours, err_theirs = _reconstruction_errors(
            refined, scipy_pipeline(layers, n)
        )
        extra["reconstruction_error"] = {"flowjax": err_ours, "scipy": err_theirs}
        notes = f"max abs W reconstruction error {err_ours:.1e} vs {err_theirs:.1e}"
    return make_row(
        SECTION_REFINE,
        "refine time",
        (
            f'refine(net, {cfg.num_steps}, linear="flow"), jit',
            "NumPy/SciPy: svd + 2 logm a layer",
        ),
        f"one ReLU layer {width}-{width}, n={n}",
        (ours, theirs),
        target=TARGET_REFINE if width == TARGET_REFINE_WIDTH else None,
        compile_s=(compile_s, None),
        notes=notes,
        extra=extra,
    )


def run_refine(cfg: RefineConfig, timing: TimingSettings) -> tuple[list[Row], dict]:
    """The rows of section 3 and the fitted growth exponents."""
    rows = [_refine_row(width, cfg, timing) for width in cfg.widths]
    fit = [r for r in rows if r.extra["width"] >= cfg.fit_from]
    widths = [r.extra["width"] for r in fit]
    exponents = {
        "widths": widths,
        "flowjax": fitted_exponent(widths, [r.flowjax_s for r in fit]),
        "scipy": fitted_exponent(widths, [r.other_s for r in fit]),
    }
    return rows, exponents


# Section 4


def relu_mlp(d: int, width: int, seed: int = 0) -> eqx.nn.MLP:
    """A float32 ReLU MLP `d -> width -> width -> d`."""
    return eqx.nn.MLP(
        d, d, width, 2, activation=jax.nn.relu, dtype=jnp.float32, key=jr.key(seed)
    )


def _vmapped(model: Any):
    arrays, static = eqx.partition(model, eqx.is_array)

    def fn(arrays, X):
        return jax.vmap(eqx.combine(arrays, static))(X)

    return fn, arrays


def _compiled_forward(model: Any, X: jax.Array):
    fn, arrays = _vmapped(model)
    compiled, compile_s = compile_jax(fn, arrays, X)
    return compiled, arrays, compile_s


def _forward_rows(
    width: int, linear: str, cfg: ForwardConfig, timing: TimingSettings
) -> list[Row]:
    mlp = relu_mlp(cfg.d, width)
    X = jr.normal(jr.key(1), (cfg.B, cfg.d), jnp.float32)
    plain, plain_arrays, plain_compile = _compiled_forward(mlp, X)
    expected = np.asarray(plain(plain_arrays, X))
    rows = []
    for K in cfg.steps:
        refined = refine(mlp, K, linear=linear)  # type: ignore[arg-type]
        ours, ours_arrays, ours_compile = _compiled_forward(refined, X)
        error = float(np.max(np.abs(np.asarray(ours(ours_arrays, X)) - expected)))
        t_ours, t_plain = time_calls(
            [blocking(ours, ours_arrays, X), blocking(plain, plain_arrays, X)], timing
        )
        rows.append(
            make_row(
                SECTION_FORWARD,
                f"forward, linear={linear!r}",
                (f'refine(mlp, {K}, linear="{linear}")', "plain eqx.nn.MLP"),
                f"MLP {cfg.d}-{width}-{width}-{cfg.d} ReLU, B={cfg.B}, K={K}",
                (t_ours, t_plain),
                target=TARGET_WHOLE if linear == "whole" else None,
                compile_s=(ours_compile, plain_compile),
                notes=f"depth {refined.depth}; max abs diff {error:.1e}",
                extra={"K": K, "width": width, "depth": refined.depth, "error": error},
            )
        )
    return rows


def storage_table(cfg: ForwardConfig) -> list[dict[str, Any]]:
    """Bytes stored by `refine(..., linear="flow")`, tied and untied, a `K`."""
    mlp = relu_mlp(cfg.d, cfg.width_flow)
    table = []
    for K in cfg.steps:
        tied = storage_bytes(refine(mlp, K, linear="flow", tied=True))
        untied = storage_bytes(refine(mlp, K, linear="flow", tied=False))
        table.append({"K": K, "tied": tied, "untied": untied})
    return table


def run_forward(
    cfg: ForwardConfig, timing: TimingSettings
) -> tuple[list[Row], list[dict[str, Any]]]:
    """The rows of section 4 and the storage table."""
    rows = []
    for width in cfg.widths_whole:
        rows.extend(_forward_rows(width, "whole", cfg, timing))
    rows.extend(_forward_rows(cfg.width_flow, "flow", cfg, timing))
    return rows, storage_table(cfg)


def plain_bytes(cfg: ForwardConfig) -> int:
    """Bytes stored by the plain MLP of the storage table."""
    return storage_bytes(relu_mlp(cfg.d, cfg.width_flow))


def storage_lines(cfg: ForwardConfig, table: list[dict[str, Any]]) -> list[str]:
    """The storage table as Markdown."""
    head = (
        f'Storage of `refine(mlp, K, linear="flow")`, MLP {cfg.d}-'
        f"{cfg.width_flow}-{cfg.width_flow}-{cfg.d} (plain: "
        f"{plain_bytes(cfg)} bytes):\n\n"
        "| K | tied bytes | untied bytes | untied / tied |\n|---:|---:|---:|---:|"
    )
    lines = [
        f"| {r['K']} | {r['tied']} | {r['untied']} | {r['untied'] / r['tied']:.3g} |"
        for r in table
    ]
    return [head + "\n" + "\n".join(lines)]


def exponent_lines(exponents: dict[str, Any]) -> list[str]:
    """The fitted growth exponents as one Markdown line."""
    widths = ", ".join(str(w) for w in exponents["widths"])
    return [
        f"Fitted growth with width (log-log least squares over widths {widths}): "
        f"flowjax t ~ w^{exponents['flowjax']:.2f}, SciPy t ~ "
        f"w^{exponents['scipy']:.2f}."
    ]
