"""Training as the inverse problem of the transport equation (sec. 1, sec. 5 item 7)."""

import os

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from scipy.linalg import expm
from sklearn.datasets import load_digits, make_circles, make_moons
from sklearn.model_selection import train_test_split

from flowjax import _training
from flowjax._classifier import FlowCoordinateMLP, FlowNet
from flowjax._training import (
    FitResult,
    TrainingDivergedError,
    evaluate,
    fit,
    load_checkpoint,
    save_checkpoint,
    softmax_cross_entropy,
)
from flowjax._transport import Integrator


def _split(X, y, dtype=np.float32):
    Xtr, Xte, ytr, yte = train_test_split(
        X.astype(dtype), y, test_size=0.5, random_state=0, stratify=y
    )
    return (Xtr, ytr), (Xte, yte)


def _moons(num=2000):
    return _split(*make_moons(num, noise=0.1, random_state=0))


def _circles(num=2000):
    return _split(*make_circles(num, factor=0.5, noise=0.05, random_state=0))


def _small_net(**kwargs):
    options = dict(n=3, hidden=16, num_blocks=8, key=jr.key(0), T=2.0)
    options.update(kwargs)
    return FlowNet.init(2, 2, dtype=jnp.float32, **options)


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(la, lb, strict=True)
    )


# 1. Accuracy on standard data sets


@pytest.mark.parametrize("make", [_moons, _circles], ids=["moons", "circles"])
def test_flow_classifier_on_two_dimensional_data(make):
    train, test = make()
    result = fit(
        _small_net(), optax.adam(1e-2), train, batch_size=100, epochs=30, key=jr.key(1)
    )
    metrics = evaluate(result.model, test)
    epoch_time = np.median(result.history.epochs["time"][1:])
    print(f"test accuracy {metrics['accuracy']:.4f}, {epoch_time * 1e3:.1f} ms/epoch")
    assert metrics["accuracy"] >= 0.99
    assert jax.vmap(result.model)(jnp.asarray(test[0])).dtype == jnp.float32
    assert len(result.history.epochs["time"]) == 30


def test_flow_classifier_on_digits():
    X, y = load_digits(return_X_y=True)
    (Xtr, ytr), (Xte, yte) = _split(X / 16.0, y)
    net = FlowNet.init(
        64, 10, n=64, hidden=64, num_blocks=4, key=jr.key(0), dtype=jnp.float32
    )
    result = fit(
        net, optax.adam(3e-3), (Xtr, ytr), batch_size=64, epochs=30, key=jr.key(1)
    )
    metrics = evaluate(result.model, (Xte, yte))
    epoch_time = np.median(result.history.epochs["time"][1:])
    print(f"test accuracy {metrics['accuracy']:.4f}, {epoch_time * 1e3:.1f} ms/epoch")
    assert metrics["accuracy"] >= 0.95


# The forward map and the regularizers against NumPy loops


def _numpy_euler(net: FlowNet, x: np.ndarray):
    """Eq. 14-17 by hand: states, and sum_k dt_k |v_k|^2."""
    p = jax.tree.map(np.asarray, net.grid.params)
    ts = np.asarray(net.grid.ts)
    y = np.zeros(net.n)
    y[: x.shape[0]] = x
    energy = 0.0
    for k in range(len(ts) - 1):
        v = p.W2[k] @ np.tanh(p.W1[k] @ y + p.b1[k]) + p.b2[k]
        energy += (ts[k + 1] - ts[k]) * v @ v
        y = y + (ts[k + 1] - ts[k]) * v
    return np.asarray(net.W_out) @ y + np.asarray(net.b_out), energy


def test_euler_path_is_the_resnet_and_its_kinetic_energy(rng):
    net = FlowNet.init(3, 2, n=5, hidden=7, num_blocks=6, key=jr.key(3), scale=1.0)
    x = rng.normal(size=3)
    out, energy = net.forward_with_energy(jnp.asarray(x))
    expected_out, expected_energy = _numpy_euler(net, x)
    np.testing.assert_allclose(out, expected_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(net(jnp.asarray(x)), expected_out, rtol=1e-12)
    np.testing.assert_allclose(energy, expected_energy, rtol=1e-12)


def test_checkpointed_euler_steps_give_the_same_gradient(rng):
    net = FlowNet.init(2, 2, n=3, hidden=4, num_blocks=3, key=jr.key(0))
    x = jnp.asarray(rng.normal(size=2))

    def gradient(model):
        grads = eqx.filter_grad(lambda m: jnp.sum(m(x) ** 2))(model)
        return jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))

    assert _leaves_equal(gradient(net), gradient(net.replace(checkpoint=True)))


@pytest.mark.slow
def test_adaptive_kinetic_energy_is_the_limit_of_euler(rng):
    net = FlowNet.init(
        2, 2, n=3, hidden=5, num_blocks=3, key=jr.key(4), interpolation="linear"
    )
    x = jnp.asarray(rng.normal(size=2))
    tight = Integrator(
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12)
    )
    out, energy = net.replace(method="adaptive", integrator=tight).forward_with_energy(
        x
    )
    errors = []
    for K in (64, 128):
        out_K, energy_K = net.replace(num_steps=K).forward_with_energy(x)
        errors.append(abs(float(energy_K - energy)) / float(energy))
    print("relative energy error at K = 64, 128:", errors)
    assert errors[1] < 0.6 * errors[0] and errors[1] < 1e-2


def test_time_smoothness_is_the_sum_of_squared_block_differences():
    net = FlowNet.init(2, 2, n=3, hidden=4, num_blocks=5, key=jr.key(5))
    expected = sum(
        np.sum(np.diff(np.asarray(a), axis=0) ** 2)
        for a in jax.tree.leaves(net.grid.params)
    )
    np.testing.assert_allclose(net.time_smoothness(), expected, rtol=1e-12)


def test_regularizers_lower_what_they_measure():
    (X, y), _ = _moons(400)
    common = dict(batch_size=100, steps=200, key=jr.key(1))
    plain = fit(_small_net(), optax.adam(1e-2), (X, y), **common).model
    regular = fit(
        _small_net(), optax.adam(1e-2), (X, y), kinetic=0.01, smoothness=0.01, **common
    ).model
    x = jnp.asarray(X)
    energy = [jnp.mean(jax.vmap(m.forward_with_energy)(x)[1]) for m in (plain, regular)]
    smooth = [m.time_smoothness() for m in (plain, regular)]
    print("kinetic energy", energy, "smoothness", smooth)
    assert energy[1] < 0.25 * energy[0]  # measured: 2.2 against 17.9
    assert smooth[1] < 0.1 * smooth[0]  # measured: 7.9 against 531
    assert evaluate(regular, (X, y))["accuracy"] > 0.99


# 2. Discretize-then-optimize against optimize-then-discretize


def _tight(adjoint=None) -> Integrator:
    pid = diffrax.PIDController(rtol=1e-10, atol=1e-10)
    if adjoint is None:
        return Integrator(stepsize_controller=pid)
    return Integrator(stepsize_controller=pid, adjoint=adjoint)


@pytest.fixture(scope="module")
def gradient_problem():
    net = FlowNet.init(
        2,
        2,
        n=3,
        hidden=8,
        num_blocks=4,
        key=jr.key(0),
        interpolation="linear",
        scale=1.0,
    )
    X = jr.normal(jr.key(2), (16, 2))
    y = (X[:, 0] * X[:, 1] > 0).astype(jnp.int32)

    @eqx.filter_jit
    def gradient(model):
        def loss(m):
            return softmax_cross_entropy(jax.vmap(m)(X), y)

        grads = eqx.filter_grad(loss)(model)
        grads = eqx.filter(grads, model.trainable_spec())
        return jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])

    reference = gradient(net.replace(method="adaptive", integrator=_tight()))
    return net, gradient, reference


def test_discretize_gradient_converges_to_adaptive_like_one_over_k(gradient_problem):
    net, gradient, reference = gradient_problem
    steps = np.array([8, 16, 32])
    errors = np.array(
        [
            float(jnp.linalg.norm(gradient(net.replace(num_steps=int(K))) - reference))
            / float(jnp.linalg.norm(reference))
            for K in steps
        ]
    )
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    print(
        "relative gradient difference",
        dict(zip(steps.tolist(), errors, strict=True)),
        slope,
    )
    assert np.all(np.diff(errors) < 0)
    assert -1.2 < slope < -0.8
    assert errors[-1] < 0.05  # measured: 0.12, 0.057, 0.028


def test_backsolve_and_recursive_checkpoint_adjoints_agree(gradient_problem):
    net, gradient, reference = gradient_problem
    backsolve = diffrax.BacksolveAdjoint(
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-10)
    )
    grads = gradient(net.replace(method="adaptive", integrator=_tight(backsolve)))
    difference = float(jnp.linalg.norm(grads - reference) / jnp.linalg.norm(reference))
    print("backsolve vs recursive checkpoint:", difference)
    assert difference < 1e-7


@pytest.mark.slow
@pytest.mark.parametrize(
    "adjoint",
    [
        diffrax.RecursiveCheckpointAdjoint(),
        diffrax.BacksolveAdjoint(
            stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-5)
        ),
    ],
    ids=["recursive", "backsolve"],
)
def test_fit_on_the_adaptive_path(adjoint):
    (X, y), test = _moons(512)
    integrator = Integrator(
        stepsize_controller=diffrax.PIDController(rtol=1e-4, atol=1e-5),
        adjoint=adjoint,
        max_steps=256,
    )
    net = _small_net(
        num_blocks=4, method="adaptive", integrator=integrator, interpolation="linear"
    )
    result = fit(
        net,
        optax.adam(1e-2),
        (X, y),
        batch_size=64,
        steps=100,
        key=jr.key(1),
        kinetic=0.01,
    )
    print("epoch times", result.history.epochs["time"])
    assert evaluate(result.model, test)["accuracy"] > 0.97


# 3. A known transport is recovered


def test_rotation_transport_is_recovered(rng):
    A = np.array([[0.0, -1.0], [1.0, 0.0]])  # v(x) = A x turns by 1 rad in time 1
    R = expm(A)
    X_train = rng.uniform(-1, 1, size=(512, 2))
    X_test = rng.uniform(-1, 1, size=(1000, 2))
    net = FlowNet.init(
        2,
        2,
        n=2,
        hidden=32,
        num_blocks=8,
        key=jr.key(0),
        task="regression",
        readout="project",
        interpolation="linear",
    )
    steps = 2000
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, steps))
    result = fit(
        net,
        optimizer,
        (X_train, X_train @ R.T),
        batch_size=128,
        steps=steps,
        key=jr.key(1),
    )
    flow_map = jax.vmap(result.model.transport)(jnp.asarray(X_test))
    error = np.max(np.linalg.norm(np.asarray(flow_map) - X_test @ R.T, axis=1))
    print(f"max error of the learned flow map on held-out points: {error:.2e}")
    assert error < 3e-2


_FIELD_CALLS: list[int] = []


def _counted_tanh(z):
    """tanh that counts its runs: the field applies it once an evaluation."""
    jax.debug.callback(lambda: _FIELD_CALLS.append(1))
    return jnp.tanh(z)


def _field_calls_and_stats(net: FlowNet, x) -> tuple[int, dict[str, int]]:
    _FIELD_CALLS.clear()
    stats = eqx.filter_jit(net.solver_stats)(jnp.asarray(x))
    jax.effects_barrier()
    return len(_FIELD_CALLS), {name: int(value) for name, value in stats.items()}


def test_solver_stats_count_the_field_evaluations():
    options = dict(n=3, hidden=8, num_blocks=4, key=jr.key(0), T=2.0, scale=1.0)
    net = FlowNet.init(2, 2, sigma=_counted_tanh, **options)
    # Fixed steps: Euler with dt0 = T / 8 takes 8 steps of one evaluation each.
    euler = Integrator(
        solver=diffrax.Euler(),
        stepsize_controller=diffrax.ConstantStepSize(),
        dt0=0.25,
    )
    calls, stats = _field_calls_and_stats(
        net.replace(method="adaptive", integrator=euler), [0.3, 1.0]
    )
    assert calls == stats["num_steps"] == stats["num_accepted_steps"] == 8
    assert stats["num_rejected_steps"] == 0
    # The Euler ResNet path: one evaluation a step.
    calls, stats = _field_calls_and_stats(net.replace(num_steps=16), [0.3, 1.0])
    assert calls == stats["num_steps"] == 16
    # Adaptive Tsit5 on a linear grid: 6 evaluations a step tried, plus the first.
    linear = FlowNet.init(
        2, 2, sigma=_counted_tanh, interpolation="linear", method="adaptive", **options
    )
    for x in ([0.3, -1.2], [2.0, 1.0]):
        calls, stats = _field_calls_and_stats(linear, x)
        steps = stats["num_accepted_steps"] + stats["num_rejected_steps"]
        assert stats["num_steps"] == steps >= 4  # a step at least a block
        assert calls == 6 * stats["num_steps"] + 1
    # Under vmap: one count an input; the flow map is the transport's.
    X = jnp.asarray([[0.3, -1.2], [2.0, 1.0]])
    y, stats = jax.vmap(lambda x: linear.transport_with_stats(linear.embed(x)))(X)
    assert stats["num_steps"].shape == (2,)
    np.testing.assert_allclose(
        y, jax.vmap(lambda x: linear.transport(linear.embed(x)))(X)
    )


# 4. Checkpoints and resume


def test_resume_is_bit_identical(tmp_path):
    (X, y), _ = _moons(300)  # 150 examples: 4 steps an epoch at batch 32
    net = _small_net(num_blocks=4)
    optimizer = optax.adamw(1e-2)
    options = dict(batch_size=32, key=jr.key(7), kinetic=0.01, smoothness=0.1)
    full = fit(net, optimizer, (X, y), steps=11, **options)

    path = tmp_path / "run.ckpt"
    first = fit(net, optimizer, (X, y), steps=6, checkpoint_path=path, **options)
    assert not _leaves_equal(first.model, full.model)
    resumed = fit(
        net, optimizer, (X, y), steps=11, checkpoint_path=path, resume=True, **options
    )
    assert _leaves_equal(resumed.model, full.model)
    assert _leaves_equal(resumed.opt_state, full.opt_state)
    assert resumed.history.steps == full.history.steps
    assert resumed.history.epochs["loss"] == full.history.epochs["loss"]


def test_checkpoint_every_and_resume_past_the_end(tmp_path):
    (X, y), _ = _moons(300)
    path = tmp_path / "run.ckpt"
    saved = []
    options = dict(batch_size=50, key=jr.key(0), checkpoint_path=path)
    result = fit(
        _small_net(),
        optax.sgd(1e-2),
        (X, y),
        steps=6,
        checkpoint_every=4,
        callback=lambda step, _: saved.append((step, os.path.exists(path))),
        **options,
    )
    assert saved[3] == (4, False)  # the callback runs before the save of step 4
    assert saved[4] == (5, True)
    again = fit(_small_net(), optax.sgd(1e-2), (X, y), steps=6, resume=True, **options)
    assert _leaves_equal(again.model, result.model)


def test_resume_refuses_other_settings(tmp_path):
    (X, y), _ = _moons(300)
    path = tmp_path / "run.ckpt"
    fit(
        _small_net(),
        optax.sgd(1e-2),
        (X, y),
        batch_size=50,
        steps=2,
        key=jr.key(0),
        checkpoint_path=path,
    )
    with pytest.raises(ValueError, match="batch_size=50, this run has batch_size=30"):
        fit(
            _small_net(),
            optax.sgd(1e-2),
            (X, y),
            batch_size=30,
            steps=4,
            key=jr.key(0),
            checkpoint_path=path,
            resume=True,
        )
    with pytest.raises(ValueError, match="key_data"):
        fit(
            _small_net(),
            optax.sgd(1e-2),
            (X, y),
            batch_size=50,
            steps=4,
            key=jr.key(1),
            checkpoint_path=path,
            resume=True,
        )


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "state.ckpt"
    old = {"w": jnp.arange(3.0)}
    save_checkpoint(path, old, {"step": 1})

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": jnp.zeros(3)}, {"step": 2})
    monkeypatch.undo()
    state, header = load_checkpoint(path, old)
    assert header["step"] == 1 and _leaves_equal(state, old)
    assert os.listdir(tmp_path) == ["state.ckpt"]


def test_damaged_checkpoint_is_refused(tmp_path):
    path = tmp_path / "state.ckpt"
    save_checkpoint(path, {"w": jnp.arange(3.0)}, {"step": 1})
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(ValueError, match="damaged"):
        load_checkpoint(path, {"w": jnp.arange(3.0)})
    path.write_bytes(b"not a checkpoint\n")
    with pytest.raises(ValueError, match="not a flowjax checkpoint"):
        load_checkpoint(path, {"w": jnp.arange(3.0)})


# The loop: compiled once, deterministic, reports progress


_TRACES: list[int] = []


class _CountingModel(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x):
        _TRACES.append(1)  # a Python side effect: runs only while tracing
        return self.linear(x)


def test_step_is_compiled_once():
    (X, y), _ = _moons(400)
    model = _CountingModel(eqx.nn.Linear(2, 2, key=jr.key(0)))
    after_first_step = []

    def callback(step, metrics):
        if step == 1:
            after_first_step.append(len(_TRACES))

    fit(
        model,
        optax.adam(1e-2),
        (X, y),
        batch_size=64,
        epochs=3,
        key=jr.key(0),
        task="classification",
        callback=callback,
    )
    assert after_first_step[0] >= 1
    assert len(_TRACES) == after_first_step[0]


_UPDATE_TRACES: list[float] = []


def _counting_sgd(learning_rate: float) -> optax.GradientTransformation:
    """SGD that records each trace of its update (a Python side effect)."""

    def init(params):
        return optax.EmptyState()

    def update(grads, state, params=None):
        _UPDATE_TRACES.append(learning_rate)
        return jax.tree.map(lambda g: -learning_rate * g, grads), state

    return optax.GradientTransformation(init, update)


def _mlp(seed: int, activation=jax.nn.tanh) -> eqx.nn.MLP:
    return eqx.nn.MLP(2, 2, 8, 1, activation=activation, key=jr.key(seed))


class _SmoothMLP(eqx.Module):
    """An MLP with a stand-in `time_smoothness` (for the smoothness objective)."""

    mlp: eqx.nn.MLP

    def __call__(self, x):
        return self.mlp(x)

    def time_smoothness(self):
        arrays = jax.tree.leaves(eqx.filter(self.mlp, eqx.is_inexact_array))
        return sum(jnp.sum(jnp.square(w)) for w in arrays)


def _traces_of(*args, **kwargs) -> tuple[int, FitResult]:
    before = len(_UPDATE_TRACES)
    result = fit(*args, task="classification", batch_size=50, steps=4, **kwargs)
    return len(_UPDATE_TRACES) - before, result


def _uncached(*args, **kwargs) -> FitResult:
    """`fit` with an empty step cache: the program compiled afresh."""
    saved = dict(_training._STEP_CACHE)
    _training._STEP_CACHE.clear()
    try:
        return fit(*args, task="classification", batch_size=50, steps=4, **kwargs)
    finally:
        _training._STEP_CACHE.update(saved)


def test_a_second_fit_of_the_same_structure_does_not_retrace():
    (X, y), _ = _moons(300)
    first, _ = _traces_of(_mlp(0), _counting_sgd(0.1), (X, y), key=jr.key(0))
    assert first >= 1
    # Another instance of the optimizer, other weights, data and seed: no trace.
    X2, y2 = X[::-1].copy(), y[::-1].copy()
    again, result = _traces_of(_mlp(1), _counting_sgd(0.1), (X2, y2), key=jr.key(1))
    assert again == 0
    fresh = _uncached(_mlp(1), _counting_sgd(0.1), (X2, y2), key=jr.key(1))
    assert _leaves_equal(result.model, fresh.model)
    # optax's own transformations (closures) are keyed by their settings too.
    adam = [optax.chain(_counting_sgd(1.0), optax.adam(1e-2)) for _ in range(2)]
    assert _traces_of(_mlp(0), adam[0], (X, y), key=jr.key(0))[0] >= 1
    assert _traces_of(_mlp(2), adam[1], (X, y), key=jr.key(2))[0] == 0


def _counted_adam(lr: float = 0.1, b1: float = 0.9) -> optax.GradientTransformation:
    return optax.chain(_counting_sgd(lr), optax.adam(1e-2, b1=b1))


@pytest.mark.parametrize(
    "change", ["learning rate", "optax setting", "activation", "objective"]
)
def test_another_program_is_never_served_from_the_cache(change):
    (X, y), _ = _moons(300)
    base = dict(model=_mlp(0), optimizer=_counted_adam(), smoothness=0.0)
    if change == "objective":  # with and without a regularizer
        base["model"] = _SmoothMLP(_mlp(0))
    other = {
        "learning rate": dict(optimizer=_counted_adam(lr=0.3)),
        "optax setting": dict(optimizer=_counted_adam(b1=0.5)),
        "activation": dict(model=_mlp(0, jax.nn.relu)),
        "objective": dict(smoothness=0.1),
    }[change]
    other = {**base, **other}
    model, optimizer = base.pop("model"), base.pop("optimizer")
    _traces_of(model, optimizer, (X, y), key=jr.key(0), **base)
    model, optimizer = other.pop("model"), other.pop("optimizer")
    traces, result = _traces_of(model, optimizer, (X, y), key=jr.key(0), **other)
    assert traces >= 1
    fresh = _uncached(model, optimizer, (X, y), key=jr.key(0), **other)
    assert _leaves_equal(result.model, fresh.model)


_GLOBAL_RATE = 0.1


def _scaled_by_global_rate(g):
    return -_GLOBAL_RATE * g


def test_program_keys():
    key = _training._program_key
    assert key(optax.adam(1e-2)) == key(optax.adam(1e-2))
    assert key(optax.adam(1e-2)) != key(optax.adam(2e-2))
    assert key(_counting_sgd(0.0)) != key(_counting_sgd(-0.0))
    state = [1.0]
    scaled = optax.scale_by_schedule(lambda count: state[0])
    before = key(scaled)
    state[0] = 2.0  # a closure over a list: keyed by the list's contents
    assert key(scaled) != before
    global _GLOBAL_RATE
    read_global = optax.GradientTransformation(
        lambda p: optax.EmptyState(),
        lambda g, s, p=None: (jax.tree.map(_scaled_by_global_rate, g), s),
    )
    before = key(read_global)
    _GLOBAL_RATE = 1.0  # a module constant the update reads through a helper
    try:
        assert key(read_global) != before
    finally:
        _GLOBAL_RATE = 0.1
    with pytest.raises(_training._Uncacheable):
        key(optax.scale(jnp.ones(10_000)))  # too large an array to key by value
    with pytest.raises(_training._Uncacheable):
        jax.jit(lambda x: key(x))(1.0)  # a tracer


class _Slotted:
    __slots__ = ("rate",)

    def __init__(self, rate):
        self.rate = rate


def test_an_optimizer_that_cannot_be_keyed_compiles_afresh():
    (X, y), _ = _moons(300)

    def slotted_sgd(holder):
        def update(grads, state, params=None):
            _UPDATE_TRACES.append(holder.rate)
            return jax.tree.map(lambda g: -holder.rate * g, grads), state

        return optax.GradientTransformation(lambda p: optax.EmptyState(), update)

    counts = [
        _traces_of(_mlp(0), slotted_sgd(_Slotted(rate)), (X, y), key=jr.key(0))[0]
        for rate in (0.1, 0.1)
    ]
    assert counts[0] >= 1 and counts[1] == counts[0]


def test_same_key_same_run_and_other_key_other_run():
    (X, y), _ = _moons(300)
    runs = [
        fit(_small_net(), optax.adam(1e-2), (X, y), batch_size=32, steps=3, key=key)
        for key in (jr.key(3), jr.key(3), jr.key(4))
    ]
    assert _leaves_equal(runs[0].model, runs[1].model)
    assert not _leaves_equal(runs[0].model, runs[2].model)


def test_callback_and_history():
    (X, y), _ = _moons(300)  # 150 examples, batch 40: 3 steps an epoch
    seen = []
    result = fit(
        _small_net(),
        optax.adam(1e-2),
        (X, y),
        batch_size=40,
        steps=7,
        key=jr.key(0),
        callback=lambda step, metrics: seen.append((step, metrics)),
    )
    assert [step for step, _ in seen] == list(range(1, 8))
    assert set(seen[0][1]) == {"loss", "data_loss", "accuracy"}
    assert result.history.steps["loss"] == [m["loss"] for _, m in seen]
    assert len(result.history.epochs["loss"]) == 2  # complete epochs only
    np.testing.assert_allclose(
        result.history.epochs["loss"][1], np.mean(result.history.steps["loss"][3:6])
    )


def test_regression_with_one_target_per_row(rng):
    X = rng.normal(size=(64, 2)).astype(np.float32)
    y = (X[:, 0] - X[:, 1]).astype(np.float32)
    net = FlowNet.init(
        2,
        1,
        n=3,
        hidden=8,
        num_blocks=2,
        key=jr.key(0),
        task="regression",
        dtype=jnp.float32,
    )
    result = fit(net, optax.adam(1e-2), (X, y), batch_size=16, steps=200, key=jr.key(0))
    assert evaluate(result.model, (X, y))["data_loss"] < 0.05


# Models with a key: dropout and noise in the forward pass


class _DropoutMLP(eqx.Module):
    """`x -> W2 dropout(tanh(W1 x + b1)) + b2`; takes `key=` like eqx.nn.Dropout."""

    first: eqx.nn.Linear
    dropout: eqx.nn.Dropout
    last: eqx.nn.Linear

    def __init__(self, seed: int, p: float = 0.2):
        k1, k2 = jr.split(jr.key(seed))
        self.first = eqx.nn.Linear(2, 32, key=k1)
        self.dropout = eqx.nn.Dropout(p)
        self.last = eqx.nn.Linear(32, 2, key=k2)

    def __call__(self, x, *, key=None):
        return self.last(self.dropout(jnp.tanh(self.first(x)), key=key))


def test_a_dropout_model_trains_and_evaluates_deterministically():
    (X, y), test = _moons(600)
    options = dict(batch_size=50, key=jr.key(0), task="classification")
    with pytest.raises(RuntimeError, match="key"):  # dropout needs a key to train
        fit(_DropoutMLP(0), optax.adam(1e-2), (X, y), steps=1, **options)
    result = fit(
        _DropoutMLP(0), optax.adam(3e-2), (X, y), epochs=60, stochastic=True, **options
    )
    metrics = evaluate(result.model, test, task="classification")
    assert metrics["accuracy"] >= 0.95
    assert evaluate(result.model, test, task="classification") == metrics
    # evaluate is the model without dropout: the same as inference mode by hand
    plain = eqx.nn.inference_mode(result.model)
    logits = jax.vmap(plain)(jnp.asarray(test[0]))
    expected = np.mean(np.argmax(np.asarray(logits), axis=1) == test[1])
    assert metrics["accuracy"] == pytest.approx(expected)


class _NoisyOffset(eqx.Module):
    """`x -> b + z` with `z ~ N(0, 1)` drawn from the key: the loss shows the keys."""

    b: jax.Array

    def __call__(self, x, *, key):
        return self.b + jr.normal(key, (1,), self.b.dtype)


def test_every_example_of_every_step_gets_the_documented_key():
    N, key = 16, jr.key(5)
    X, y = np.zeros((N, 1), np.float32), np.zeros(N, np.float32)
    model = _NoisyOffset(jnp.asarray([0.25], jnp.float32))
    result = fit(
        model,
        optax.sgd(0.0),
        (X, y),
        batch_size=N,
        steps=3,
        key=key,
        task="regression",
        stochastic=True,
    )
    # All examples are equal, so the loss of step s is mean_i (b + z_i)^2 over the
    # keys split(fold_in(fold_in(key, 2**32 - 1), s), N), whatever the batch order.
    for step, loss in enumerate(result.history.steps["loss"]):
        keys = jr.split(jr.fold_in(jr.fold_in(key, 2**32 - 1), step), N)
        z = np.array([float(jr.normal(k, (1,), jnp.float32)[0]) for k in keys])
        assert len(set(z)) == N  # a key an example
        assert loss == pytest.approx(np.mean((0.25 + z) ** 2), rel=1e-5)
    losses = result.history.steps["loss"]
    assert len(set(losses)) == 3  # other keys every step


def test_stochastic_resume_is_bit_identical(tmp_path):
    (X, y), _ = _moons(300)
    options = dict(batch_size=30, key=jr.key(2), task="classification", stochastic=True)
    full = fit(_DropoutMLP(1), optax.adam(1e-2), (X, y), steps=9, **options)
    path = tmp_path / "run.ckpt"
    fit(
        _DropoutMLP(1),
        optax.adam(1e-2),
        (X, y),
        steps=4,
        checkpoint_path=path,
        **options,
    )
    resumed = fit(
        _DropoutMLP(1),
        optax.adam(1e-2),
        (X, y),
        steps=9,
        checkpoint_path=path,
        resume=True,
        **options,
    )
    assert _leaves_equal(resumed.model, full.model)
    assert resumed.history.steps == full.history.steps
    with pytest.raises(ValueError, match="stochastic=True, this run has stochastic"):
        fit(
            _DropoutMLP(1, p=0.0),
            optax.adam(1e-2),
            (X, y),
            steps=9,
            checkpoint_path=path,
            resume=True,
            **dict(options, stochastic=False),
        )


def test_stochastic_needs_a_model_that_takes_a_key():
    (X, y), _ = _moons(300)
    with pytest.raises(TypeError, match=r"_SmoothMLP.__call__ takes no `key`"):
        fit(
            _SmoothMLP(_mlp(0)),
            optax.sgd(0.1),
            (X, y),
            batch_size=50,
            steps=1,
            key=jr.key(0),
            task="classification",
            stochastic=True,
        )
    with pytest.raises(TypeError, match=r"forward_with_energy takes no `key`"):
        fit(
            _KeyedCallOnly(_mlp(0)),
            optax.sgd(0.1),
            (X, y),
            batch_size=50,
            steps=1,
            key=jr.key(0),
            task="classification",
            kinetic=0.1,
            stochastic=True,
        )


class _KeyedCallOnly(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, x, *, key=None):
        return self.mlp(x)

    def forward_with_energy(self, x):
        return self.mlp(x), jnp.zeros(())


# 5. Bad input


def test_labels_outside_the_class_range():
    (X, y), _ = _moons(300)
    y = y.copy()
    y[17] = 2
    with pytest.raises(ValueError, match=r"label 2 at row 17 .* range 0\.\.1"):
        fit(
            _small_net(),
            optax.adam(1e-2),
            (X, y),
            batch_size=10,
            steps=1,
            key=jr.key(0),
        )
    y[17] = -1
    with pytest.raises(ValueError, match=r"label -1 at row 17"):
        fit(
            _small_net(),
            optax.adam(1e-2),
            (X, y),
            batch_size=10,
            steps=1,
            key=jr.key(0),
        )
    with pytest.raises(ValueError, match=r"label 0.5 at row 3 is not"):
        evaluate(_small_net(), (X, np.where(np.arange(150) == 3, 0.5, 0.0)))


def test_batch_larger_than_the_data():
    (X, y), _ = _moons(100)
    with pytest.raises(ValueError, match=r"batch_size=51 is larger than the data \(50"):
        fit(
            _small_net(),
            optax.adam(1e-2),
            (X, y),
            batch_size=51,
            steps=1,
            key=jr.key(0),
        )


def test_nan_in_the_data():
    (X, y), _ = _moons(100)
    X = X.copy()
    X[12, 1] = np.nan
    with pytest.raises(ValueError, match=r"X contain 1 non-finite .* row 12, column 1"):
        fit(
            _small_net(),
            optax.adam(1e-2),
            (X, y),
            batch_size=10,
            steps=1,
            key=jr.key(0),
        )
    target = np.ones((50, 2))
    target[4, 0] = np.inf
    net = _small_net(task="regression")
    with pytest.raises(ValueError, match=r"targets y contain .* row 4, column 0"):
        fit(
            net,
            optax.adam(1e-2),
            (np.ones((50, 2)), target),
            batch_size=10,
            steps=1,
            key=jr.key(0),
        )


@pytest.mark.parametrize(
    "optimizer, match",
    [
        (optax.adam, r"got the callable 'adam', which is not one\. Call an optim"),
        ("adam", r"optax.GradientTransformation .* got str\.$"),
        (lambda g: g, r"got the callable '<lambda>'"),
        (
            optax.constant_schedule(0.1),
            r"callable .* not one\..*optax\.adam\(learning_rate=schedule\)",
        ),
    ],
)
def test_optimizer_that_is_not_an_optax_transformation(optimizer, match):
    (X, y), _ = _moons(100)
    with pytest.raises(TypeError, match=match) as info:
        fit(_small_net(), optimizer, (X, y), batch_size=10, steps=1, key=jr.key(0))
    assert "got function" not in str(info.value)


@pytest.mark.parametrize(
    "model, wanted",
    [
        (eqx.nn.MLP(4, 3, 8, 1, key=jr.key(0)), r"takes inputs of shape \(4,\)\."),
        (_small_net(), r"takes inputs of shape \(2,\)\."),
        (
            eqx.nn.Sequential([eqx.nn.Linear(4, 3, key=jr.key(0))]),
            r"cannot take them \(.*\)\.",
        ),
    ],
)
def test_inputs_of_the_wrong_width(model, wanted):
    X, y = np.zeros((40, 3), np.float32), np.zeros(40, np.int32)
    match = r"^X has shape \(40, 3\): rows of shape \(3,\), but the model " + wanted
    options = dict(batch_size=10, steps=1, key=jr.key(0), task="classification")
    with pytest.raises(ValueError, match=match):
        fit(model, optax.adam(1e-2), (X, y), **options)
    with pytest.raises(ValueError, match=match):
        evaluate(model, (X, y), task="classification")


def test_other_bad_arguments():
    (X, y), _ = _moons(100)
    net, opt = _small_net(), optax.adam(1e-2)
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        fit(net, opt, (X, y), batch_size=10, key=jr.key(0))
    with pytest.raises(ValueError, match="same number of examples"):
        fit(net, opt, (X, y[:-1]), batch_size=10, steps=1, key=jr.key(0))
    with pytest.raises(TypeError, match="pass task="):
        fit(
            eqx.nn.Linear(2, 2, key=jr.key(0)),
            opt,
            (X, y),
            batch_size=10,
            steps=1,
            key=jr.key(0),
        )
    with pytest.raises(TypeError, match="kinetic regularization needs"):
        fit(
            eqx.nn.Linear(2, 2, key=jr.key(0)),
            opt,
            (X, y),
            batch_size=10,
            steps=1,
            key=jr.key(0),
            task="classification",
            kinetic=1.0,
        )
    with pytest.raises(ValueError, match="in_size=4 must be between 1 and"):
        FlowNet.init(4, 2, n=3, hidden=4, num_blocks=2, key=jr.key(0))


def _nan_at(count: int) -> optax.GradientTransformation:
    """SGD whose update number `count` (from 0) is NaN."""

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(grads, state, params=None):
        scale = jnp.where(state == count, jnp.nan, -1e-2)
        return jax.tree.map(lambda g: scale * g, grads), state + 1

    return optax.GradientTransformation(init, update)


def test_nan_loss_stops_with_the_last_good_parameters():
    (X, y), _ = _moons(300)
    options = dict(batch_size=30, key=jr.key(0))
    good = fit(_small_net(), _nan_at(2), (X, y), steps=2, **options)
    with pytest.raises(
        TrainingDivergedError, match=r"at step 3 .*smaller learning rate.*float64"
    ) as info:
        fit(_small_net(), _nan_at(2), (X, y), steps=10, **options)
    error = info.value
    assert error.step == 3
    assert _leaves_equal(error.model, good.model)
    assert len(error.history.steps["loss"]) == 3


def test_blow_up_of_a_too_large_learning_rate_is_caught():
    (X, y), _ = _moons(300)
    with pytest.raises(TrainingDivergedError) as info:
        fit(
            _small_net(scale=1.0),
            optax.sgd(1e36),
            (X, y),
            batch_size=30,
            steps=50,
            key=jr.key(0),
        )
    arrays = jax.tree.leaves(eqx.filter(info.value.model, eqx.is_inexact_array))
    assert all(np.all(np.isfinite(a)) for a in arrays)
    assert "smaller learning rate" in str(info.value)


# Flow coordinates (eq. 19-23)


def test_flow_coordinate_layers_stay_rotations_and_match_numpy(rng):
    (X, y), test = _split(*make_moons(600, noise=0.1, random_state=1), dtype=np.float64)
    net = FlowCoordinateMLP.init(2, 2, width=8, depth=3, key=jr.key(0))
    result = fit(net, optax.adam(1e-2), (X, y), batch_size=50, epochs=40, key=jr.key(1))
    trained = result.model
    U, V = trained.rotations()
    eye = np.eye(8)
    for R in (*U, *V):
        np.testing.assert_allclose(R.T @ R, eye, atol=1e-12)
        np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    # the forward pass against SciPy's expm of the generators (eq. 22-23)
    x = rng.normal(size=2)
    h = np.zeros(8)
    h[:2] = x
    A, B = np.asarray(trained.A), np.asarray(trained.B)
    for layer in range(3):
        W = (
            expm(A[layer] - A[layer].T)
            @ np.diag(np.exp(trained.lam[layer]))
            @ expm(B[layer] - B[layer].T)
        )
        h = W @ h + np.asarray(trained.b[layer])
        h = np.tanh(h) if layer < 2 else h
    np.testing.assert_allclose(trained(jnp.asarray(x)), h[:2], rtol=1e-10)
    assert evaluate(trained, test)["accuracy"] > 0.97
