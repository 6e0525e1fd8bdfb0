"""The continuous flow model reproduces the plain net it came from (eq. 48-50)."""

import functools
import re

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
from helpers import as_array, load_case, random_sequential, sequential

import flowjax


TIGHT = flowjax.Integrator(
    stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12), max_steps=100_000
)

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
    "relu6": jax.nn.relu6,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "softplus": jax.nn.softplus,
    "identity": None,
}

SHAPES = {
    "grow": (3, 5, 6),
    "shrink": (6, 4, 2),
    "equal": (4, 4, 4),
}


# In the default suite: ReLU on every shape, tanh on the widths that grow and
# shrink, sigmoid and the identity on square layers; the rest of the grid (the other
# piecewise-linear and smooth activations, covered by the same code paths) is
# marked slow to keep the default suite short.
DEFAULT_CASES = {
    ("relu", "grow"), ("relu", "shrink"), ("relu", "equal"), ("tanh", "grow"),
    ("tanh", "shrink"), ("sigmoid", "equal"), ("identity", "equal"),
}  # fmt: skip
CASES = [
    pytest.param(
        name,
        shape,
        marks=() if (name, shape) in DEFAULT_CASES else pytest.mark.slow,
    )
    for name in ACTIVATIONS
    for shape in SHAPES
]


@pytest.mark.parametrize("name, shape", CASES)
def test_reproduces_plain_net(rng, name, shape):
    widths = SHAPES[shape]
    net = random_sequential(rng, widths, ACTIVATIONS[name], negative_det=True)
    model = flowjax.flow_model(net, integrator=TIGHT)
    xs = rng.normal(size=(3, widths[0]))
    for x in xs:
        np.testing.assert_allclose(
            model(jnp.asarray(x)), net(jnp.asarray(x)), atol=1e-7
        )


def test_negative_determinant_is_padded(rng):
    """Case 05: a 3x3 layer with det -2 gets a fourth dimension and still works."""
    W = np.load("tests/cases/case05_negative_det_weight.npy")
    net = sequential([W], [np.zeros(3)], [jnp.tanh])
    model = flowjax.flow_model(net, integrator=TIGHT)
    assert model.flow.n == 4
    x = jnp.asarray(rng.normal(size=3))
    np.testing.assert_allclose(model(x), net(x), atol=1e-7)


@pytest.mark.parametrize("key", ["rank1_diag", "rank1_dense"])
def test_rank_deficient_weights(rng, key):
    """Case 06: zero singular values go through the -kappa stretch (eq. 21)."""
    W = as_array(load_case("case06_singular_and_nan_weights.json")[key])
    net = sequential([W], [np.array([0.3, -0.2])], [jax.nn.relu])
    model = flowjax.flow_model(net, integrator=TIGHT)
    x = jnp.asarray(rng.normal(size=2))
    np.testing.assert_allclose(model(x), net(x), atol=1e-7)


def test_nan_weight_refused():
    """Case 06: a NaN weight is refused with a message naming the layer."""
    W = as_array(load_case("case06_singular_and_nan_weights.json")["with_nan"])
    net = sequential([np.eye(2), W], [np.zeros(2), np.zeros(2)], [jnp.tanh, None])
    with pytest.raises(ValueError, match="layer 1 has a non-finite W"):
        flowjax.flow_model(net)


def test_relu_stage_endpoint():
    """Case 07: the ReLU activation flow from y reaches relu(y), although the field
    is singular at the stage's end, where off-the-shelf adaptive solves stall."""
    case = load_case("case07_relu_homotopy_endpoint.json")
    y = jnp.asarray(case["y"])
    net = sequential([np.eye(3)], [np.zeros(3)], [jax.nn.relu])
    for scaling in ("linear", "cubic", "smooth"):
        model = flowjax.flow_model(net, time_scaling=scaling)
        np.testing.assert_allclose(model(y), case["expected"], atol=1e-6)

    # Straight to s = 1 on the bare stage field: never a silent wrong value.
    sigma = flowjax.activation(jax.nn.relu)
    args = (sigma, flowjax.time_scaling("linear"))
    z = flowjax.flow_map(flowjax.activation_field, y, 0.0, 1.0, args)
    np.testing.assert_allclose(z, case["expected"], atol=1e-6)


def test_softmax_refused_tanh_accepted(rng):
    """Case 10: softmax is not elementwise; a tanh final activation works."""
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="elementwise"):
        flowjax.flow_model(
            eqx.nn.MLP(3, 2, 4, 1, final_activation=jax.nn.softmax, key=key)
        )
    mlp = eqx.nn.MLP(3, 2, 4, 1, final_activation=jax.nn.tanh, key=key)
    model = flowjax.flow_model(mlp, integrator=TIGHT)
    x = jnp.asarray(rng.normal(size=3), jnp.float32)
    np.testing.assert_allclose(model(x), mlp(x), atol=1e-6)


MLP_OPTIONS = {
    "scalar_in": dict(in_size="scalar", out_size=2, width_size=3, depth=1),
    "scalar_out": dict(in_size=2, out_size="scalar", width_size=3, depth=2),
    "depth0": dict(in_size=3, out_size=2, width_size=4, depth=0),
    "no_bias": dict(in_size=2, out_size=2, width_size=3, depth=1, use_bias=False),
    "no_final_bias": dict(
        in_size=2, out_size=2, width_size=3, depth=1, use_final_bias=False
    ),
    "scan": dict(in_size=2, out_size=3, width_size=4, depth=3, scan=True),
    "sigmoid_final": dict(
        in_size=2, out_size=2, width_size=3, depth=1, final_activation=jax.nn.sigmoid
    ),
}


@pytest.mark.parametrize("option", MLP_OPTIONS)
def test_mlp_options(rng, option):
    mlp = eqx.nn.MLP(**MLP_OPTIONS[option], key=jax.random.key(1), dtype=jnp.float64)
    model = flowjax.flow_model(mlp, integrator=TIGHT)
    shape = () if mlp.in_size == "scalar" else (mlp.in_size,)
    x = jnp.asarray(rng.normal(size=shape))
    out = model(x)
    assert out.shape == mlp(x).shape
    np.testing.assert_allclose(out, mlp(x), atol=1e-7)


def test_float32(rng):
    mlp = eqx.nn.MLP(
        3, 2, 5, 2, activation=jnp.tanh, key=jax.random.key(2), dtype=jnp.float32
    )
    model = flowjax.flow_model(mlp)
    x = jnp.asarray(rng.normal(size=3), jnp.float32)
    out = model(x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, mlp(x), atol=1e-4)


def test_jit_and_vmap_match_loop(rng):
    mlp = eqx.nn.MLP(2, 2, 3, 1, key=jax.random.key(3), dtype=jnp.float64)
    model = flowjax.flow_model(mlp)
    xs = jnp.asarray(rng.normal(size=(4, 2)))
    batched = eqx.filter_jit(lambda m, xs: jax.vmap(m)(xs))(model, xs)
    looped = jnp.stack([model(x) for x in xs])
    np.testing.assert_allclose(batched, looped, rtol=1e-12, atol=1e-12)


def test_network_field_against_solve_ivp(rng):
    """One whole network integrated by SciPy on the glued field (eq. 50)."""
    widths = (3, 4, 2)
    net = random_sequential(rng, widths, jnp.tanh)
    model = flowjax.flow_model(net, integrator=TIGHT)
    x = rng.normal(size=3)
    field = jax.jit(lambda t, y: model.vector_field(t, y, model.args))

    def rhs(t, y):
        return np.asarray(field(jnp.asarray(t), jnp.asarray(y)))

    y0 = np.asarray(model.embed(jnp.asarray(x)))
    ivp = scipy.integrate.solve_ivp(rhs, (0.0, model.T), y0, rtol=1e-10, atol=1e-12)
    assert ivp.success
    np.testing.assert_allclose(
        model.readout(jnp.asarray(ivp.y[:, -1])), net(x), atol=1e-6
    )
    np.testing.assert_allclose(model(jnp.asarray(x)), net(x), atol=1e-7)


def test_stage_states_follow_the_five_stages(rng):
    """After the stages of one layer the state is, in turn, V x, Sigma V x, W x,
    W x + b and sigma(W x + b) (eq. 24-33, 42)."""
    net = random_sequential(rng, (3, 3), None)
    net = sequential(
        [np.asarray(net.layers[0].weight)], [np.asarray(net.layers[0].bias)], [jnp.tanh]
    )
    model = flowjax.flow_model(net, integrator=TIGHT)
    x = rng.normal(size=3)
    states = np.asarray(model.stage_states(jnp.asarray(x)))
    layer = model.flow.layers[0]
    W, b = np.asarray(layer.W), np.asarray(layer.b)
    y = np.asarray(model.embed(jnp.asarray(x)))
    np.testing.assert_allclose(states[3], W @ y, atol=1e-8)
    np.testing.assert_allclose(states[4], W @ y + b, atol=1e-8)
    np.testing.assert_allclose(states[5], np.tanh(W @ y + b), atol=1e-8)


def test_transport_at_intermediate_time(rng):
    """`u(x, t)` for `t` at a layer boundary is the rest of the net applied to `x`."""
    net = random_sequential(rng, (2, 3, 2), jnp.tanh)
    model = flowjax.flow_model(net, integrator=TIGHT)
    z = jnp.asarray(rng.normal(size=model.flow.n))
    u, _ = model.flow_map(z, 1.0)
    second = net.layers[2]
    expected = second.weight @ z[:3] + second.bias
    np.testing.assert_allclose(model.readout(u), expected, atol=1e-7)


def test_solve_batch_matches_per_sample_solves_and_the_net(rng):
    """One joint solve of the batch per stage (solve_batch) against vmapped
    per-sample solves and the plain net, at t = 0 and at an intermediate time."""
    net = random_sequential(rng, (3, 5, 2), jnp.tanh, negative_det=True)
    model = flowjax.flow_model(net, integrator=TIGHT)
    xs = jnp.asarray(rng.normal(size=(6, 3)))
    ts = jnp.asarray([0.0, 0.7])
    joint, steps = eqx.filter_jit(
        jax.vmap(flowjax.FlowModel.solve_batch, (None, None, 0))
    )(model, xs, ts)
    per_sample, each = eqx.filter_jit(
        jax.vmap(jax.vmap(flowjax.FlowModel.solve, (None, 0, None)), (None, None, 0))
    )(model, xs, ts)
    np.testing.assert_allclose(joint[0], jax.vmap(net)(xs), atol=1e-7)
    np.testing.assert_allclose(joint, per_sample, atol=1e-7)
    # One step sequence for the batch: fewer steps than the samples' together.
    assert np.all((0 < steps) & (steps < jnp.sum(each, axis=1)))


def test_eager_calls_reuse_one_program_and_check_traced_times():
    """Called without jit, later calls of solve and solve_batch do not compile
    again; a traced time that is NaN or outside [0, T] is an error, not clamped;
    a time that is not a scalar is named."""
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    model = flowjax.flow_model(mlp)
    xs = jnp.ones((2, 3))
    model.solve_batch(xs)
    model.solve(xs[0])
    compiled = flowjax._flow_model._compiled_flow_map._cached._cache_size()
    model.solve_batch(xs)
    model.solve(xs[0])
    assert flowjax._flow_model._compiled_flow_map._cached._cache_size() == compiled

    solve = eqx.filter_jit(lambda m, x, t: m.solve_batch(x, t))
    for bad in (jnp.nan, -0.5, 2.5, jnp.inf):
        with pytest.raises(Exception, match=r"t must be finite and lie in \[0, 2.0\]"):
            solve(model, xs, jnp.asarray(bad))
    with pytest.raises(ValueError, match=r"one network time.*shape \(2,\)"):
        model.solve_batch(xs, jnp.asarray([0.0, 1.0]))


def test_solve_batch_refuses_bad_batches():
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    model = flowjax.flow_model(mlp)
    for shape in [(0, 3), (3,), (2, 4), ()]:
        expected = rf"shape \('B', 3\).*{re.escape(str(shape))}"
        with pytest.raises(ValueError, match=expected):
            model.solve_batch(jnp.zeros(shape))
    with pytest.raises(Exception, match="NaN or inf"):
        model.solve_batch(jnp.full((2, 3), jnp.nan))


def test_counts_solver_steps(rng):
    net = random_sequential(rng, (2, 3, 2), jax.nn.relu)
    model = flowjax.flow_model(net)
    _, steps = model.solve(jnp.asarray(rng.normal(size=2)))
    assert 4 <= int(steps) < 4096


class _Scale(eqx.Module):
    """A custom module with a parameter, which flowjax cannot read as a layer."""

    w: jax.Array

    def __call__(self, x):
        return self.w * x


class TestBadInput:
    def test_wrong_input_shape(self):
        mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
        with pytest.raises(
            ValueError, match=r"inputs of shape \(3,\).*got shape \(4,\)"
        ):
            flowjax.flow_model(mlp)(jnp.zeros(4))

    def test_refused_activation(self):
        mlp = eqx.nn.MLP(3, 2, 4, 1, activation=jax.nn.gelu, key=jax.random.key(0))
        with pytest.raises(ValueError, match="activation.*non-decreasing"):
            flowjax.flow_model(mlp)

    @pytest.mark.parametrize("kappa", [0.0, -1.0, float("inf")])
    def test_bad_kappa(self, kappa):
        mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
        with pytest.raises(ValueError, match="kappa"):
            flowjax.flow_model(mlp, kappa=kappa)

    @pytest.mark.parametrize("t", [-0.5, 2.5])
    def test_time_outside_interval(self, t):
        mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
        with pytest.raises(
            ValueError, match=r"outside the model's interval \[0, 2.0\]"
        ):
            flowjax.flow_model(mlp).solve(jnp.zeros(3), t)

    def test_unsupported_layer(self):
        seq = eqx.nn.Sequential(
            [eqx.nn.Linear(2, 3, key=jax.random.key(0)), eqx.nn.Dropout(0.5)]
        )
        with pytest.raises(TypeError, match="Dropout"):
            flowjax.flow_model(seq)

    @pytest.mark.parametrize(
        "make, fragment",
        [
            (lambda k: eqx.nn.Dropout(0.1), "Dropout is not supported"),
            (lambda k: eqx.nn.LayerNorm(3), "normalisation layers are not supported"),
            (lambda k: eqx.nn.Conv1d(1, 1, 1, key=k), "convolutions and pooling"),
            (lambda k: _Scale(jnp.ones(3)), "_Scale is an equinox Module"),
            (lambda k: 3.0, "3.0 is not callable"),
        ],
    )
    @pytest.mark.parametrize("after_activation", [False, True])
    def test_unsupported_layer_is_named_with_its_index(
        self, make, fragment, after_activation
    ):
        key = jax.random.key(0)
        activations = [jax.nn.relu] if after_activation else []
        seq = eqx.nn.Sequential([eqx.nn.Linear(2, 3, key=key), *activations, make(key)])
        index = len(activations) + 1
        with pytest.raises(TypeError) as err:
            flowjax.flow_model(seq)
        message = str(err.value)
        assert message.startswith(f"layer {index} of the Sequential"), message
        assert fragment in message
        assert "second activation" not in message
        assert "Allowed: an eqx.nn.MLP" in message  # says what is allowed

    def test_second_activation_is_still_named(self):
        linear = eqx.nn.Linear(2, 3, key=jax.random.key(0))
        seq = eqx.nn.Sequential([linear, jax.nn.relu, jax.nn.tanh])
        with pytest.raises(TypeError, match="layer 2 .* second activation"):
            flowjax.flow_model(seq)

    def test_not_a_network(self):
        with pytest.raises(TypeError, match="Conv1d"):
            flowjax.flow_model(eqx.nn.Conv1d(1, 1, 3, key=jax.random.key(0)))

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_input_is_named_not_max_steps(self, bad):
        mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
        model = flowjax.flow_model(mlp)
        x = jnp.zeros(3).at[1].set(bad)
        batch = jnp.stack([jnp.zeros(3), x])
        calls = [
            (model, x, "the input x"),
            (jax.jit(lambda x: model(x)), x, "the input x"),
            (jax.jit(jax.vmap(lambda x: model(x))), batch, "the input x"),
            (jax.jit(lambda x: model.flow_map(model.embed(x))[0]), x, "the state y"),
            (model.stage_states, x, "the input x"),
        ]
        if bad == float("inf"):
            calls = calls[1:2]  # every path checks the same isfinite; one suffices
        for call, argument, what in calls:
            with pytest.raises(Exception) as err:
                call(argument)
            message = str(err.value)
            assert f"FlowModel: {what} contains NaN or inf" in message
            assert "reached max_steps" not in message

    def test_max_steps_is_reported(self, rng):
        net = random_sequential(rng, (3, 3, 3), jax.nn.sigmoid)
        integrator = flowjax.Integrator(
            stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-12),
            max_steps=3,
        )
        model = flowjax.flow_model(net, integrator=integrator)
        with pytest.raises(Exception, match="max_steps=3"):
            model(jnp.asarray(rng.normal(size=3)))
