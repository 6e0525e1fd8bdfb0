"""Section 2: adaptive solves against torchdiffeq's `odeint(method="dopri5")`.

Both sides integrate the same field with the same weights (copied into PyTorch),
in float32, with equal `rtol` and `atol` in the same error norm (RMS over the
state, `atol + rtol |y|` scaled):

- a neural-ODE two-layer field `f(y) = W2 tanh(W1 y + b1) + b2` (eq. 2) on
  `[0, 1]`, the batch carried as one `(B, n)` state on both sides;
- the flow model of a plain ReLU MLP (eq. 48-50): stage by stage, as
  `flowjax.flow_model` does (four linear stages, then the activation stage up to
  `tau = 1 - activation_cut`, closed exactly). PyTorch solves each stage for the
  whole batch as one state; so does `FlowModel.solve_batch` (the like-for-like
  row, with the target), while `jax.vmap(model.solve)` gives each sample its own
  steps (a second row, stricter error control, for comparison).

Function evaluations: torchdiffeq's are counted in the field's `forward`; diffrax
reports steps, and its Tsit5/Dopri5 solves cost 6 evaluations a step attempt plus
1 (checked against a callback counter in `tests/test_benchmarks.py`).
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from flowjax._flow_model import FlowModel, flow_model
from flowjax._neural_flow import NeuralFlow
from flowjax._transport import Integrator
from flowjax._two_layer import TwoLayerField, TwoLayerParams

from ._harness import Row, TimingSettings, blocking, compile_jax, make_row, time_calls


SECTION = "2. Adaptive continuous model"
TARGET = 0.1
OTHER = 'torchdiffeq odeint(method="dopri5")'
SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "Tsit5": diffrax.Tsit5,
    "Dopri5": diffrax.Dopri5,
}
FIELD = TwoLayerField(jnp.tanh)


@dataclasses.dataclass(frozen=True)
class AdaptiveConfig:
    """Neural ODE: state `n`, width `m`, batch `B`; flow model of an MLP
    `d -> width -> d` (one hidden ReLU layer); tolerances `rtol`, `atol`; the
    diffrax solvers on flowjax's side."""

    n: int
    m: int
    B: int
    mlp_in: int
    mlp_width: int
    rtol: float = 1e-5
    atol: float = 1e-7
    solvers: tuple[str, ...] = ("Tsit5", "Dopri5")


FULL = AdaptiveConfig(n=16, m=64, B=256, mlp_in=16, mlp_width=64)
TINY = AdaptiveConfig(n=4, m=8, B=8, mlp_in=3, mlp_width=6, solvers=("Tsit5",))


def nfe_from_steps(steps: Any, num_solves: int = 1) -> Any:
    """Evaluations of diffrax's FSAL Tsit5/Dopri5: `6 steps + 1` a solve."""
    return 6 * steps + num_solves


def torch_available() -> bool:
    """Whether PyTorch and torchdiffeq import."""
    try:
        import torch  # noqa: F401
        import torchdiffeq  # noqa: F401
    except ImportError:
        return False
    return True


# flowjax sides


def neural_ode_problem(cfg: AdaptiveConfig, seed: int = 0):
    """Float32 weights of the two-layer field and a batch `Y0: (B, n)`."""
    kp, ky = jr.split(jr.key(seed))
    p = TwoLayerParams.init(cfg.n, cfg.m, key=kp, dtype=jnp.float32, scale=1.0)
    return p, jr.normal(ky, (cfg.B, cfg.n), jnp.float32)


def batched_field(t: Any, Y: jax.Array, p: TwoLayerParams) -> jax.Array:
    """The two-layer field on a batch of states `Y: (B, n)`."""
    return jax.vmap(lambda y: FIELD(t, y, p))(Y)


def flowjax_neural_ode(solver: str, cfg: AdaptiveConfig):
    """`(p, Y0) -> (Y(1), steps)` with `NeuralFlow` and a PID controller."""

    def solve(p, Y0):
        flow = NeuralFlow(
            batched_field,
            p,
            solver=SOLVERS[solver](),
            stepsize_controller=diffrax.PIDController(rtol=cfg.rtol, atol=cfg.atol),
        )
        sol = flow.solve(Y0)
        assert sol.ys is not None and sol.stats is not None
        return sol.ys[-1], sol.stats["num_steps"]

    return solve


def mlp_problem(cfg: AdaptiveConfig, seed: int = 1):
    """A float32 ReLU MLP `d -> width -> d` and a batch of inputs `X: (B, d)`."""
    km, kx = jr.split(jr.key(seed))
    mlp = eqx.nn.MLP(
        cfg.mlp_in,
        cfg.mlp_in,
        cfg.mlp_width,
        1,
        activation=jax.nn.relu,
        dtype=jnp.float32,
        key=km,
    )
    return mlp, jr.normal(kx, (cfg.B, cfg.mlp_in), jnp.float32)


def flowjax_flow_model(solver: str, cfg: AdaptiveConfig, mlp: Any) -> FlowModel:
    """`flowjax.flow_model(mlp)` with the given solver and a PID controller."""
    integrator = Integrator(
        solver=SOLVERS[solver](),
        stepsize_controller=diffrax.PIDController(rtol=cfg.rtol, atol=cfg.atol),
    )
    return flow_model(mlp, integrator=integrator)


def model_call(model: FlowModel, joint: bool = False) -> tuple[Callable[..., Any], Any]:
    """`(fn, arrays)` with `fn(arrays, X) -> (outputs, steps)`: `solve` vmapped
    over `X` (steps per sample), or with `joint` one `solve_batch` of `X`."""
    arrays, static = eqx.partition(model, eqx.is_array)

    def fn(arrays, X):
        model = eqx.combine(arrays, static)
        return model.solve_batch(X) if joint else jax.vmap(model.solve)(X)

    return fn, arrays


# The flowjax sides of the flow-model rows: (label suffix, joint solve?).
FLOW_MODEL_CALLS = ((" solve_batch", True), (" vmap(solve)", False))


def num_solves(model: FlowModel) -> int:
    """Adaptive solves per sample: four linear stages a layer, plus one
    activation stage a layer that is not the identity."""
    layers = model.flow.layers
    return 4 * len(layers) + sum(layer.sigma.name != "identity" for layer in layers)


# PyTorch sides (imported only when torch is there)


class _Counted:
    """A PyTorch vector field `f(t, y)` that counts its calls."""

    def __init__(self, f: Callable[[Any, Any], Any]):
        self.f = f
        self.calls = 0

    def __call__(self, t: Any, y: Any) -> Any:
        self.calls += 1
        return self.f(t, y)


def _tensor(x: Any):
    import torch

    return torch.from_numpy(np.array(x, dtype=np.float32))


def torch_neural_ode(p: TwoLayerParams, cfg: AdaptiveConfig):
    """`Y0 -> (Y(1), evaluations)` with torchdiffeq dopri5 on the same weights."""
    import torch
    from torchdiffeq import odeint

    W1, b1, W2, b2 = (_tensor(a) for a in (p.W1, p.b1, p.W2, p.b2))
    ts = torch.tensor([0.0, 1.0])

    def solve(Y0):
        field = _Counted(lambda t, y: torch.tanh(y @ W1.T + b1) @ W2.T + b2)
        with torch.no_grad():
            Y = odeint(field, Y0, ts, rtol=cfg.rtol, atol=cfg.atol, method="dopri5")
        assert isinstance(Y, torch.Tensor)
        return Y[-1], field.calls

    return solve


def _smooth_cutoff_f32() -> float:
    """Below `c` the smooth step and its derivative underflow to 0 in float32."""
    smallest = float(np.finfo(np.float32).smallest_subnormal)
    return 1.0 / (1.1 * -math.log(smallest) + 10.0)


def _smooth_scaling(s: Any) -> tuple[Any, Any]:
    """`tau'(s)` and `1 - tau(s)` of the smooth step `sigmoid(1/(1-s) - 1/s)`."""
    import torch

    c = _smooth_cutoff_f32()
    inside = (s > c) & (s < 1 - c)
    s_safe = torch.where(inside, s, torch.full_like(s, 0.5))
    x = 1 / (1 - s_safe) - 1 / s_safe
    dx = 1 / (1 - s_safe) ** 2 + 1 / s_safe**2
    dtau = torch.where(inside, torch.sigmoid(x) * torch.sigmoid(-x) * dx, 0.0)
    one_minus = torch.where(inside, torch.sigmoid(-x), (s <= c).to(s.dtype))
    return dtau, one_minus


def torch_flow_model(model: FlowModel, cfg: AdaptiveConfig):
    """`X -> (outputs, evaluations)`: the flow model's stages solved with
    torchdiffeq dopri5 on the flow parameters `(Q, lam, P, b)` of `model`."""
    import torch
    from torchdiffeq import odeint

    if model.time_scaling.name != "smooth":
        raise ValueError("the PyTorch flow model implements the smooth scaling only")
    layers = [
        (_tensor(L.Q), _tensor(L.lam), _tensor(L.P), _tensor(L.b), L.sigma.name)
        for L in model.flow.layers
    ]
    for *_, name in layers:
        if name not in ("relu", "identity"):
            raise ValueError(f"the PyTorch flow model has relu only, got {name}")
    s_cut = model.time_scaling.one_minus_tau_inverse(model.activation_cut)
    n, d_out = model.flow.n, model.flow.d_out
    unit, to_cut = torch.tensor([0.0, 1.0]), torch.tensor([0.0, s_cut])

    def stage(f, y, ts) -> torch.Tensor:
        ys = odeint(f, y, ts, rtol=cfg.rtol, atol=cfg.atol, method="dopri5")
        assert isinstance(ys, torch.Tensor)
        return ys[-1]

    def relu_velocity(s, z):
        dtau, one_minus = _smooth_scaling(s)
        return dtau * torch.where(z >= 0, 0.0, -z / one_minus)

    def solve(X):
        counted = []

        def run(f, y, ts):
            field = _Counted(f)
            counted.append(field)
            return stage(field, y, ts)

        y = torch.nn.functional.pad(X, (0, n - X.shape[1]))
        with torch.no_grad():
            for Q, lam, P, b, name in layers:
                y = run(lambda s, y, Q=Q: _smooth_scaling(s)[0] * (y @ Q.T), y, unit)
                y = run(
                    lambda s, y, lam=lam: _smooth_scaling(s)[0] * (y * lam), y, unit
                )
                y = run(lambda s, y, P=P: _smooth_scaling(s)[0] * (y @ P.T), y, unit)
                y = run(
                    lambda s, y, b=b: _smooth_scaling(s)[0] * b.expand_as(y), y, unit
                )
                if name == "relu":
                    z = run(relu_velocity, y, to_cut)
                    # Close the stage exactly: relu(sigma_tau^{-1}(z)) = relu(z).
                    y = torch.relu(z)
        return y[:, :d_out], sum(f.calls for f in counted)

    return solve


# Rows


def _max_abs(a: Any, b: Any) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _rows(
    benchmark: str,
    shapes: str,
    measured: dict[str, Any],
    compile_s: dict[str, float],
    figures: dict[str, dict[str, Any]],
    cfg: AdaptiveConfig,
) -> list[Row]:
    rows = []
    theirs = figures["torch"]
    for side in (name for name in figures if name != "torch"):
        ours = figures[side]
        notes = (
            f"NFE {ours['nfe']} vs {theirs['nfe']}; max abs diff "
            f"{ours['max_abs_diff']:.1e}"
        )
        if "max_abs_error_vs_mlp" in ours:
            notes += (
                f"; error vs MLP {ours['max_abs_error_vs_mlp']:.1e} vs "
                f"{theirs['max_abs_error_vs_mlp']:.1e}"
            )
        rows.append(
            make_row(
                SECTION,
                benchmark,
                (f"flowjax {side}", OTHER),
                f"{shapes}, rtol={cfg.rtol:g} atol={cfg.atol:g}",
                (measured[side], measured["torch"]),
                target=None if side.endswith("vmap(solve)") else TARGET,
                compile_s=(compile_s[side], None),
                notes=notes,
                extra={"flowjax": ours, "other": theirs},
            )
        )
    return rows


def _neural_ode(cfg: AdaptiveConfig, timing: TimingSettings) -> list[Row]:
    p, Y0 = neural_ode_problem(cfg)
    Y0_torch = _tensor(Y0)
    compiled, compile_s, figures, calls = {}, {}, {}, []
    torch_solve = torch_neural_ode(p, cfg)
    Y_torch, nfe_torch = torch_solve(Y0_torch)
    for solver in cfg.solvers:
        with jax.default_matmul_precision("highest"):
            compiled[solver], compile_s[solver] = compile_jax(
                flowjax_neural_ode(solver, cfg), p, Y0
            )
        Y, steps = compiled[solver](p, Y0)
        figures[solver] = {
            "nfe": int(nfe_from_steps(int(steps))),
            "steps": int(steps),
            "max_abs_diff": _max_abs(Y, Y_torch.numpy()),
        }
        calls.append(blocking(compiled[solver], p, Y0))
    figures["torch"] = {"nfe": int(nfe_torch)}
    calls.append(lambda: torch_solve(Y0_torch))
    times = time_calls(calls, timing, warm=(*(True for _ in cfg.solvers), False))
    measured = dict(zip([*cfg.solvers, "torch"], times, strict=True))
    shapes = f"two-layer tanh field, B={cfg.B} n={cfg.n} m={cfg.m}, t in [0, 1]"
    return _rows("neural ODE", shapes, measured, compile_s, figures, cfg)


def _flow_model(cfg: AdaptiveConfig, timing: TimingSettings) -> list[Row]:
    mlp, X = mlp_problem(cfg)
    expected = np.asarray(jax.vmap(mlp)(X))
    compiled, compile_s, figures, calls, arrays = {}, {}, {}, [], {}
    model = flowjax_flow_model("Tsit5", cfg, mlp)
    torch_solve = torch_flow_model(model, cfg)
    X_torch = _tensor(X)
    out_torch, nfe_torch = torch_solve(X_torch)
    sides = [
        (solver + suffix, solver, joint)
        for solver in cfg.solvers
        for suffix, joint in FLOW_MODEL_CALLS
    ]
    for side, solver, joint in sides:
        model = flowjax_flow_model(solver, cfg, mlp)
        fn, arrays[side] = model_call(model, joint)
        with jax.default_matmul_precision("highest"):
            compiled[side], compile_s[side] = compile_jax(fn, arrays[side], X)
        out, steps = compiled[side](arrays[side], X)
        steps = np.asarray(steps)
        figures[side] = {
            "nfe": int(nfe_from_steps(int(steps.max()), num_solves(model))),
            "steps_max": int(steps.max()),
            "steps_mean": float(steps.mean()),
            "max_abs_diff": _max_abs(out, out_torch.numpy()),
            "max_abs_error_vs_mlp": _max_abs(out, expected),
        }
        calls.append(blocking(compiled[side], arrays[side], X))
    figures["torch"] = {
        "nfe": int(nfe_torch),
        "max_abs_error_vs_mlp": _max_abs(out_torch.numpy(), expected),
    }
    calls.append(lambda: torch_solve(X_torch))
    times = time_calls(calls, timing, warm=(*(True for _ in sides), False))
    names = [side for side, _, _ in sides]
    measured = dict(zip([*names, "torch"], times, strict=True))
    shapes = (
        f"flow model of a ReLU MLP {cfg.mlp_in}-{cfg.mlp_width}-{cfg.mlp_in}, "
        f"n={model.flow.n}, B={cfg.B}"
    )
    return _rows("flow model", shapes, measured, compile_s, figures, cfg)


def run(cfg: AdaptiveConfig, timing: TimingSettings, threads: int = 1) -> list[Row]:
    """The rows of section 2 (none without PyTorch); PyTorch runs with
    `threads` intra-op threads (`0`: its default)."""
    if not torch_available():
        return []
    import torch

    default = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        return _neural_ode(cfg, timing) + _flow_model(cfg, timing)
    finally:
        torch.set_num_threads(default)
