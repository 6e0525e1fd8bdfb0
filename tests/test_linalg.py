"""Tests of the linear algebra of a layer as a flow (eq. 19-23).

Oracles: `scipy.linalg.expm` (rotations are compared in the group, never through
generators, since `scipy.linalg.logm` is not a logarithm near pi), closed forms,
NumPy determinants and eigenvalues.
"""

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from flowjax._linalg import (
    embed_layer,
    embedding_dim,
    layer_generators,
    layer_svd,
    proper_svd,
    skew_log,
    stretch_generator,
)


CASES = Path(__file__).parent / "cases"
PI = np.pi


def load_case(name: str):
    with open(CASES / name) as f:
        data = json.load(f)

    def nan_for_null(value):
        if isinstance(value, list):
            return [nan_for_null(v) for v in value]
        return np.nan if value is None else value

    return {k: nan_for_null(v) for k, v in data.items()}


# ---------------------------------------------------------------------------------
# Rotations for the tests
# ---------------------------------------------------------------------------------


def random_rotation(rng, n: int) -> np.ndarray:
    """A Haar-random element of SO(n) (QR of a Gaussian matrix, signs fixed)."""
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    Q = Q * np.sign(np.diag(R))
    if np.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    return Q


def rotation_with_angles(rng, n: int, angles) -> np.ndarray:
    """A rotation turning planes by `angles`, in a random orthonormal frame.

    Built in closed form (cos/sin blocks), so an angle of pi gives an exact -1.
    """
    R = np.eye(n)
    for k, theta in enumerate(angles):
        i, j = 2 * k, 2 * k + 1
        R[i, i] = R[j, j] = np.cos(theta)
        R[j, i], R[i, j] = np.sin(theta), -np.sin(theta)
    frame = random_rotation(rng, n)
    return frame @ R @ frame.T


def hard_rotations(rng, n: int) -> dict[str, np.ndarray]:
    """The hard cases of a rotation logarithm in dimension `n`."""
    k = n // 2
    cases = {
        "identity": np.eye(n),
        "random": random_rotation(rng, n),
        "near identity 1e-8": rotation_with_angles(rng, n, [1e-8]),
        "near identity 1e-4": rotation_with_angles(rng, n, [1e-4] * k),
        "one plane at pi": rotation_with_angles(rng, n, [PI]),
        "pi - 1e-10": rotation_with_angles(rng, n, [PI - 1e-10]),
        "pi - 1e-14": rotation_with_angles(rng, n, [PI - 1e-14]),
        "random with pi": rotation_with_angles(
            rng, n, [PI, *rng.uniform(-PI, PI, k - 1)]
        ),
    }
    if n % 2 == 0:
        cases["-I"] = -np.eye(n)
        cases["-I rotated"] = rotation_with_angles(rng, n, [PI] * k)
    if k >= 2:
        cases["two planes at pi"] = rotation_with_angles(rng, n, [PI, PI])
        cases["repeated angle 2"] = rotation_with_angles(rng, n, [2.0] * k)
        cases["repeated pi - 1e-10"] = rotation_with_angles(rng, n, [PI - 1e-10] * k)
        cases["pi and pi - 1e-12"] = rotation_with_angles(rng, n, [PI, PI - 1e-12])
        cases["graded near pi"] = rotation_with_angles(
            rng, n, PI - np.logspace(-16, -1, k)
        )
    return cases


def rotation_error(A, R) -> float:
    """`max |expm(A) - R|` in float64, the oracle of every logarithm test."""
    A = np.asarray(A, np.float64)
    return float(np.abs(scipy.linalg.expm(A) - np.asarray(R, np.float64)).max())


def max_angle(A) -> float:
    """The largest rotation angle of the skew `A` (its spectral radius)."""
    return float(np.abs(np.linalg.eigvals(np.asarray(A, np.float64))).max())


def max_rotation_angle(U) -> float:
    """The largest rotation angle of the rotation `U`, from its eigenvalues."""
    return float(np.abs(np.angle(np.linalg.eigvals(np.asarray(U, np.float64)))).max())


_batched_skew_log = jax.jit(jax.vmap(skew_log))
_batched_layer_svd = jax.jit(jax.vmap(layer_svd, in_axes=(0, None)), static_argnums=1)
BATCH = 40  # one batch size for all layer tests: one compilation per shape


# ---------------------------------------------------------------------------------
# skew_log (eq. 20)
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n", [2, 3, 4, 5, 8, 16, 64, pytest.param(256, marks=pytest.mark.slow)]
)
def test_skew_log_hard_cases_float64(rng, n):
    cases = hard_rotations(rng, n)
    A = np.asarray(_batched_skew_log(jnp.asarray(np.stack(list(cases.values())))))
    failures = {}
    for (name, R), A_k in zip(cases.items(), A, strict=True):
        assert np.array_equal(A_k, -A_k.T), name  # exactly skew
        error = rotation_error(A_k, R)
        # Principal: no angle beyond pi (beyond rounding where the angle is pi).
        angle = max_angle(A_k)
        if not (error <= 1e-10 and angle <= PI + 1e-12):
            failures[name] = (error, angle)
    assert not failures, failures


@pytest.mark.slow
def test_skew_log_n512(rng):
    n = 512
    R = rotation_with_angles(rng, n, [PI, PI, PI - 1e-10, 2.0, 2.0, 1e-8])
    R = R @ rotation_with_angles(rng, n, rng.uniform(-PI, PI, n // 2))
    R = np.stack([R, -np.eye(n)])
    A = np.asarray(_batched_skew_log(jnp.asarray(R)))
    for A_k, R_k in zip(A, R, strict=True):
        assert np.array_equal(A_k, -A_k.T)
        assert rotation_error(A_k, R_k) <= 1e-10
        assert max_angle(A_k) <= PI + 1e-12


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16, 64])
def test_skew_log_float32_random(rng, n):
    R = np.stack([random_rotation(rng, n) for _ in range(16)]).astype(np.float32)
    A = _batched_skew_log(jnp.asarray(R))
    assert A.dtype == jnp.float32
    errors = [rotation_error(A_k, R_k) for A_k, R_k in zip(A, R, strict=True)]
    assert np.median(errors) <= 1e-5
    assert max(errors) <= 1e-4


@pytest.mark.parametrize("n", [2, 4, 7, 16, 64])
def test_skew_log_float32_near_pi(rng, n):
    k = n // 2
    cases = [
        rotation_with_angles(rng, n, [PI]),
        rotation_with_angles(rng, n, [PI] * k),
        rotation_with_angles(rng, n, [PI - 1e-3, PI - 1e-5, PI - 1e-7][:k]),
        rotation_with_angles(rng, n, [PI - 1e-4] * k),
        rotation_with_angles(rng, n, PI - np.logspace(-8, -1, k)),
    ]
    R = np.stack(cases).astype(np.float32)
    A = _batched_skew_log(jnp.asarray(R))
    errors = [rotation_error(A_k, R_k) for A_k, R_k in zip(A, R, strict=True)]
    assert max(errors) <= 5e-4


def test_skew_log_is_principal_logm_for_small_rotations(rng):
    """Where the logarithm is unique and real, it is the principal one (and logm)."""
    for n in [2, 3, 6, 10]:
        X = rng.standard_normal((n, n))
        A0 = X - X.T
        A0 *= 2.5 / max_angle(A0)  # every angle in [-2.5, 2.5]
        R = scipy.linalg.expm(A0)
        A = np.asarray(skew_log(jnp.asarray(R)))
        np.testing.assert_allclose(A, A0, atol=1e-12)
        L = scipy.linalg.logm(R)
        assert np.abs(np.imag(L)).max() <= 1e-12
        np.testing.assert_allclose(A, np.real(L), atol=1e-10)


def test_skew_log_orientation_near_pi(rng):
    """At pi - 1e-6 the principal angle is below pi, not -(pi + 1e-6)."""
    for n in [2, 3, 6]:
        R = rotation_with_angles(rng, n, [PI - 1e-6] * (n // 2))
        A = skew_log(jnp.asarray(R))
        np.testing.assert_allclose(max_angle(A), PI - 1e-6, rtol=0, atol=1e-12)


def test_skew_log_vmap_matches_loop_and_jit(rng):
    R = np.stack([random_rotation(rng, 4) for _ in range(5)] + [-np.eye(4)])
    batched = np.asarray(jax.vmap(skew_log)(jnp.asarray(R)))
    jitted = jax.jit(skew_log)
    for A_k, R_k in zip(batched, R, strict=True):
        np.testing.assert_allclose(
            A_k, np.asarray(jitted(jnp.asarray(R_k))), atol=1e-13
        )


# `eqx.error_if` raises EquinoxRuntimeError under eqx.filter_jit; under jax.jit the
# exception type of a failed callback varies (JaxRuntimeError, ValueError), so the
# tests match the message only.
RUNTIME_ERRORS = Exception


def _reflection(rng, n):
    R = random_rotation(rng, n)
    R[:, 0] = -R[:, 0]
    return R


def _not_rotations(rng, n=4):
    """Inputs that are not rotations, with the message each one must give."""
    return [
        (np.eye(n) * (1 + 1e-3), "not orthogonal"),
        (rng.standard_normal((n, n)), "not orthogonal"),
        (_reflection(rng, n), "det R"),
        (np.where(np.eye(n) == 1, np.inf, 0.0), "non-finite"),
        (np.full((n, n), np.nan), "non-finite"),
    ]


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 3), (3,), ()])
def test_skew_log_refuses_non_square_shapes(shape):
    with pytest.raises(ValueError, match=rf"shape \({shape[0] if shape else ''}"):
        skew_log(jnp.ones(shape))
    with pytest.raises(ValueError, match="square matrix of shape \\(n, n\\)"):
        jax.jit(skew_log)(jnp.ones(shape))


def test_skew_log_refuses_non_rotations_eagerly(rng):
    for R, fragment in _not_rotations(rng):
        for dtype in (jnp.float32, jnp.float64):
            with pytest.raises(ValueError, match=fragment) as err:
                skew_log(jnp.asarray(R, dtype))
            assert "R^T R = I" in str(err.value)  # says what is allowed


def test_skew_log_refuses_non_rotations_under_jit_and_vmap(rng):
    jitted = jax.jit(skew_log)
    for R, fragment in _not_rotations(rng):
        with pytest.raises(RUNTIME_ERRORS, match=fragment):
            jitted(jnp.asarray(R))
        batch = jnp.stack([jnp.eye(4), jnp.asarray(R)])
        with pytest.raises(RUNTIME_ERRORS, match=fragment):
            _batched_skew_log(batch)
    with pytest.raises(RUNTIME_ERRORS, match="det R"):
        jax.grad(lambda R: skew_log(R)[1, 0])(jnp.asarray(_reflection(rng, 3)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_skew_log_accepts_rotations_from_layer_svd(rng, dtype):
    """The tolerance of the rotation check is not tripped by rounding."""
    for m, d, n in [(7, 7, 8), (16, 5, 16), (3, 40, 40)]:
        W = jnp.asarray(rng.standard_normal((m, d)), dtype)
        U, _, V = layer_svd(W, n)
        for X in (U, V):
            A = skew_log(X)  # eagerly (host check) and under jit (error_if)
            np.testing.assert_array_equal(A, jax.jit(skew_log)(X))


def test_skew_log_derivative_matches_finite_differences(rng):
    """Along curves `R expm(t Omega)` in SO(n), against central differences."""
    h = 1e-5
    for n, angles in [(3, [0.7]), (5, [1.0, 1.0]), (6, [2.5, -0.4, 0.0])]:
        R = rotation_with_angles(rng, n, angles)
        X = rng.standard_normal((n, n))
        Omega = X - X.T

        def curve(t, R=R, Omega=Omega):
            return R @ scipy.linalg.expm(t * Omega)

        fd = (
            np.asarray(skew_log(jnp.asarray(curve(h))))
            - np.asarray(skew_log(jnp.asarray(curve(-h))))
        ) / (2 * h)
        _, tangent = jax.jvp(skew_log, (jnp.asarray(R),), (jnp.asarray(R @ Omega),))
        np.testing.assert_allclose(tangent, fd, atol=1e-7 * np.abs(fd).max())


def test_skew_log_gradient_at_identity_is_finite():
    def total(R):
        return jnp.sum(skew_log(R) * jnp.arange(16.0).reshape(4, 4))

    g = jax.grad(total)(jnp.eye(4))
    assert bool(jnp.all(jnp.isfinite(g)))
    # At the identity d log = the skew part of dR, so the gradient is known.
    M = np.arange(16.0).reshape(4, 4)
    np.testing.assert_allclose(g, (M - M.T) / 2, atol=1e-12)


# ---------------------------------------------------------------------------------
# The users' cases 01-04
# ---------------------------------------------------------------------------------


def test_case01_rotation_by_a_quarter_turn():
    case = load_case("case01_rot90_2x2.json")
    R = np.array(case["R"])
    A = skew_log(jnp.asarray(R))
    np.testing.assert_allclose(A, case["expected_generator"], atol=1e-12)
    assert rotation_error(A, R) <= 1e-12
    A32 = skew_log(jnp.asarray(R, jnp.float32))
    assert A32.dtype == jnp.float32
    assert rotation_error(A32, R) <= 1e-6


def test_case02_rotation_by_pi():
    case = load_case("case02_rot_pi_3d.json")
    R = np.array(case["R"])
    for dtype, tol in [(jnp.float64, 1e-12), (jnp.float32, 1e-6)]:
        A = skew_log(jnp.asarray(R, dtype))
        assert A.dtype == dtype and not bool(jnp.any(jnp.isnan(A)))
        assert np.array_equal(A, -A.T)
        np.testing.assert_allclose(np.linalg.norm(A), case["frobenius_norm"], rtol=tol)
        distance = min(
            np.abs(A - np.array(G)).max() for G in case["expected_generator_one_of"]
        )
        assert distance <= 4 * tol
        assert rotation_error(A, R) <= tol


def test_case03_angle_beyond_pi_gives_the_principal_generator():
    case = load_case("case03_angle_beyond_pi.json")
    R = np.array(case["R"])
    A = skew_log(jnp.asarray(R))
    np.testing.assert_allclose(A, case["expected_principal_generator"], atol=1e-12)
    assert rotation_error(A, R) <= 1e-12
    assert np.abs(np.asarray(A) - np.array(case["A"])).max() > 1  # not A itself


@pytest.mark.parametrize("dtype, rtol", [(jnp.float64, 1e-12), (jnp.float32, 1e-3)])
def test_case04_tiny_angles(dtype, rtol):
    case = load_case("case04_tiny_angles.json")
    for entry in case["cases"]:
        A = skew_log(jnp.asarray(entry["R"], dtype))
        assert not bool(jnp.any(jnp.isnan(A)))
        expected = entry["expected_log_entry_1_0"]
        if expected == 0:
            assert float(A[1, 0]) == 0
        else:
            np.testing.assert_allclose(float(A[1, 0]), expected, rtol=rtol)

    def entry_1_0(theta):
        c, s = jnp.cos(theta), jnp.sin(theta)
        zero, one = jnp.zeros_like(theta), jnp.ones_like(theta)
        R = jnp.stack(
            [
                jnp.stack([c, -s, zero]),
                jnp.stack([s, c, zero]),
                jnp.stack([zero, zero, one]),
            ]
        )
        return skew_log(R)[1, 0]

    slope = jax.jit(jax.grad(entry_1_0))
    for theta in [0.0, 1e-8, 1e-4]:
        d = slope(jnp.asarray(theta, dtype))
        np.testing.assert_allclose(
            float(d),
            case["expected_derivative_d_log10_d_theta_at_0"],
            rtol=10 * float(jnp.finfo(dtype).eps),
        )


# ---------------------------------------------------------------------------------
# proper_svd and layer_svd (eq. 19)
# ---------------------------------------------------------------------------------


def assert_proper_svd(U, s, V, W_hat, tol=1e-12):
    U, s, V = (np.asarray(x, np.float64) for x in (U, s, V))
    n = W_hat.shape[0]
    assert U.shape == V.shape == (n, n) and s.shape == (n,)
    assert np.abs(U @ np.diag(s) @ V - W_hat).max() <= tol * max(1, np.abs(W_hat).max())
    assert np.all(s >= 0) and np.all(np.diff(s) <= 0)
    for X in (U, V):
        assert np.abs(X.T @ X - np.eye(n)).max() <= tol
        assert abs(np.linalg.det(X) - 1) <= tol


def square_matrices(rng):
    """Square test matrices with a proper SVD: det > 0, singular, zero, padded."""
    out = []
    for n in [2, 3, 5, 8]:
        W = rng.standard_normal((n, n))
        if np.linalg.det(W) < 0:
            W[0] = -W[0]
        out.append(W)
        out.append(-W if n % 2 == 0 else W)  # -W keeps det > 0 in even n
        r = n // 2
        out.append(rng.standard_normal((n, r)) @ rng.standard_normal((r, n)))
        out.append(np.zeros((n, n)))
    for m, d, n in [(8, 5, 8), (5, 8, 8), (8, 5, 9), (5, 8, 9), (3, 3, 4)]:
        W_hat = np.zeros((n, n))
        W_hat[:m, :d] = rng.standard_normal((m, d))
        out.append(W_hat)
    case06 = load_case("case06_singular_and_nan_weights.json")
    out.append(np.array(case06["rank1_diag"]))
    out.append(np.array(case06["rank1_dense"]))
    out.append(np.diag([3.0, -2.0, 0.0]))  # det U det V = -1, fixed by s_3 = 0
    return out


def test_proper_svd_reconstructs_with_proper_rotations(rng):
    for W in square_matrices(rng):
        U, s, V = proper_svd(W)
        assert_proper_svd(U, s, V, W)
        U, s, V = jax.jit(proper_svd)(jnp.asarray(W))
        assert_proper_svd(U, s, V, W)


def test_proper_svd_float32(rng):
    W = rng.standard_normal((5, 5)).astype(np.float32)
    W[0] *= np.sign(np.linalg.det(W))
    U, s, V = proper_svd(W)
    assert U.dtype == s.dtype == V.dtype == jnp.float32
    assert_proper_svd(U, s, V, W.astype(np.float64), tol=1e-5)


def test_proper_svd_refuses_non_square_and_non_finite():
    with pytest.raises(ValueError, match=r"square.*\(2, 3\)"):
        proper_svd(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"non-finite.*\(0, 1\)"):
        proper_svd(np.array([[1.0, np.nan], [0.0, 1.0]]))


def test_case05_negative_det_is_refused_with_the_remedy():
    W = np.array(load_case("case05_negative_det_weight.json")["W"])
    np.testing.assert_array_equal(W, np.load(CASES / "case05_negative_det_weight.npy"))
    with pytest.raises(ValueError, match=r"det W = -2 < 0.*one more dimension"):
        proper_svd(W)
    with pytest.raises(ValueError, match=r"det W = -2 < 0.*one more dimension"):
        layer_svd(W, 3)
    with pytest.raises(Exception, match=r"det W < 0.*one more dimension"):
        jax.block_until_ready(jax.jit(proper_svd)(jnp.asarray(W)))


def test_case05_is_handled_in_one_more_dimension():
    case = load_case("case05_negative_det_weight.json")
    W = np.array(case["W"])
    n = embedding_dim((3, 3), [W])
    assert n == 4
    U, s, V = layer_svd(W, n)
    W_hat, _ = embed_layer(W, np.zeros(3), n)
    assert_proper_svd(U, s, V, np.asarray(W_hat))
    np.testing.assert_allclose(s[:3], case["singular_values"], atol=1e-12)
    assert float(s[3]) == 0
    # Unavoidable here: exactly one of U, V turns one plane by pi.
    angles = [max_rotation_angle(U), max_rotation_angle(V)]
    assert sum(a > PI - 1e-6 for a in angles) == 1


def layer_shapes():
    return [
        (8, 5, 8),
        (5, 8, 8),
        (8, 5, 9),
        (5, 8, 9),
        (2, 7, 10),
        (3, 3, 4),
        (4, 4, 4),
    ]


@pytest.mark.parametrize("m, d, n", layer_shapes())
def test_layer_svd_reconstructs_with_proper_rotations(rng, m, d, n):
    Ws = rng.standard_normal((BATCH, m, d))
    if m == d == n:
        Ws[:, 0] *= np.sign(np.linalg.det(Ws))[:, None]
    Ws[1] = 0.0
    Ws[2] = rng.standard_normal((m, 1)) @ rng.standard_normal((1, d))  # rank 1
    Ws[3] = 1e-300 * Ws[4]  # tiny but nonzero
    U, s, V = _batched_layer_svd(jnp.asarray(Ws), n)
    for k, W in enumerate(Ws):
        W_hat = np.zeros((n, n))
        W_hat[:m, :d] = W
        assert_proper_svd(U[k], s[k], V[k], W_hat)


def test_layer_svd_float32(rng):
    W = rng.standard_normal((5, 3)).astype(np.float32)
    U, s, V = layer_svd(W, 6)
    assert U.dtype == s.dtype == V.dtype == jnp.float32
    W_hat = np.zeros((6, 6))
    W_hat[:5, :3] = W
    assert_proper_svd(U, s, V, W_hat, tol=1e-5)


def test_layer_svd_has_no_needless_rotations_by_pi(rng):
    """Numerical fact 2: an arbitrary null-space basis brings in rotations by pi.

    Measured on 200 random layers per shape: the plain SVD of the padded matrix
    (`proper_svd`) turns a plane by pi (to 1e-6) in 54%, 3%, 100%, 100%, 100% of
    the 8x5/8, 5x8/8, 8x5/9, 5x8/9, 2x7/10 layers (shape/n); `layer_svd` in none
    of them (nor of 1000 more per shape for 8x5/8, 5x8/9, 2x7/10).
    """
    naive_pi, ours_pi, total = 0, 0, 0
    for m, d, n in [(8, 5, 8), (5, 8, 8), (8, 5, 9), (5, 8, 9), (2, 7, 10)]:
        Ws = rng.standard_normal((BATCH, m, d))
        U, _, V = _batched_layer_svd(jnp.asarray(Ws), n)
        for k, W in enumerate(Ws):
            W_hat = np.zeros((n, n))
            W_hat[:m, :d] = W
            U0, _, V0 = proper_svd(W_hat)
            naive = max(max_rotation_angle(U0), max_rotation_angle(V0))
            ours = max(max_rotation_angle(U[k]), max_rotation_angle(V[k]))
            naive_pi += naive > PI - 1e-6
            ours_pi += ours > PI - 1e-6
            total += 1
    assert naive_pi >= total / 2  # the comparison means something
    assert ours_pi == 0


@pytest.mark.parametrize("n", [3, 4])
def test_layer_svd_square_layer_padded_once(rng, n):
    """Padded square layers: a rotation by pi only where det W < 0 forces it."""
    Ws = rng.standard_normal((BATCH, n, n))
    U, _, V = _batched_layer_svd(jnp.asarray(Ws), n + 1)
    for k, W in enumerate(Ws):
        n_pi = sum(max_rotation_angle(X[k]) > PI - 1e-6 for X in (U, V))
        assert n_pi == (1 if np.linalg.det(W) < 0 else 0)


def test_layer_svd_square_full_rank_is_a_proper_svd(rng):
    W = rng.standard_normal((4, 4))
    W[0] *= np.sign(np.linalg.det(W))
    assert_proper_svd(*layer_svd(W, 4), W)
    W[0] = -W[0]  # det W < 0
    with pytest.raises(ValueError, match="one more dimension"):
        layer_svd(W, 4)


def test_layer_svd_refuses_bad_input():
    with pytest.raises(ValueError, match=r"n=2 .* max\(m, d\) = 3"):
        layer_svd(np.ones((3, 2)), 2)
    with pytest.raises(ValueError, match="non-finite"):
        layer_svd(np.array([[np.inf, 1.0]]), 3)


# ---------------------------------------------------------------------------------
# Embedding (eq. 19)
# ---------------------------------------------------------------------------------


def test_embed_layer():
    W = np.arange(6.0).reshape(2, 3)
    b = np.array([1.0, 2.0])
    W_hat, b_hat = embed_layer(W, b, 4)
    expected = np.zeros((4, 4))
    expected[:2, :3] = W
    np.testing.assert_array_equal(W_hat, expected)
    np.testing.assert_array_equal(b_hat, [1.0, 2.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"n=2 .* max\(m, d\) = 3"):
        embed_layer(W, b, 2)
    with pytest.raises(ValueError, match=r"b has shape \(3,\).*\(2,\)"):
        embed_layer(W, np.ones(3), 4)


def test_embedding_dim(rng):
    W_neg = np.array(load_case("case05_negative_det_weight.json")["W"])
    W_pos = W_neg[::-1].copy()  # swapping rows 0 and 2 flips the sign of det
    assert np.linalg.det(W_pos) > 0
    assert embedding_dim((3, 3), [W_pos]) == 3
    assert embedding_dim((3, 3), [W_neg]) == 4
    assert embedding_dim((3, 3), [np.zeros((3, 3))]) == 3  # singular: no padding
    # Square layers narrower than the widest one have room to spare.
    weights = [rng.standard_normal(s) for s in [(5, 2), (5, 5), (3, 5), (3, 3)]]
    weights[1][0] *= np.sign(np.linalg.det(weights[1]))
    assert embedding_dim((2, 5, 5, 3, 3), weights) == 5
    weights[3] = W_neg
    assert embedding_dim((2, 5, 5, 3, 3), weights) == 5
    # Without concrete weights, conservative.
    assert embedding_dim((3, 3)) == 4
    assert embedding_dim((2, 4, 3)) == 4
    shape = jax.jit(lambda W: jnp.zeros(embedding_dim((3, 3), [W])))(W_pos).shape
    assert shape == (4,)
    with pytest.raises(ValueError, match="weight 0 has shape"):
        embedding_dim((3, 3), [np.ones((3, 2))])
    with pytest.raises(ValueError, match="widths"):
        embedding_dim((3,))
    with pytest.raises(ValueError, match="weight 1 has non-finite"):
        embedding_dim((2, 3, 3), [np.ones((3, 2)), np.full((3, 3), np.nan)])


# ---------------------------------------------------------------------------------
# Stretch generator and layer generators (eq. 21-22)
# ---------------------------------------------------------------------------------


def test_stretch_generator():
    s = jnp.array([4.0, 1.0, 1e-20, 0.0])
    lam = stretch_generator(s, 30.0)
    np.testing.assert_allclose(lam, [np.log(4.0), 0.0, -30.0, -30.0])
    grad = jax.grad(lambda s: jnp.sum(stretch_generator(s, 30.0)))(s)
    np.testing.assert_allclose(grad, [0.25, 1.0, 0.0, 0.0])
    assert stretch_generator(jnp.zeros(3, jnp.float32), 5.0).dtype == jnp.float32
    for kappa in [0.0, -1.0, np.inf, np.nan]:
        with pytest.raises(ValueError, match=f"kappa={kappa}.*positive finite"):
            stretch_generator(s, kappa)


def reconstruct(P, lam, Q) -> np.ndarray:
    P, lam, Q = (np.asarray(x, np.float64) for x in (P, lam, Q))
    return scipy.linalg.expm(P) @ np.diag(np.exp(lam)) @ scipy.linalg.expm(Q)


@pytest.mark.parametrize("m, d, n", [(8, 5, 8), (5, 8, 9), (3, 3, 4), (4, 4, 4)])
def test_layer_generators_reproduce_the_layer(rng, m, d, n):
    W = rng.standard_normal((m, d))
    if m == d == n:
        W[0] *= np.sign(np.linalg.det(W))
    kappa = 25.0
    P, lam, Q = jax.jit(layer_generators, static_argnums=(1, 2))(
        jnp.asarray(W), n, kappa
    )
    assert np.array_equal(P, -P.T) and np.array_equal(Q, -Q.T)
    W_hat = np.zeros((n, n))
    W_hat[:m, :d] = W
    assert np.abs(reconstruct(P, lam, Q) - W_hat).max() <= np.exp(-kappa) + 1e-12


@pytest.mark.parametrize("name", ["rank1_diag", "rank1_dense"])
@pytest.mark.parametrize("kappa", [5.0, 20.0])
def test_case06_rank_deficient_weights(name, kappa):
    W = np.array(load_case("case06_singular_and_nan_weights.json")[name])
    n = embedding_dim((2, 2), [W])
    assert n == 2
    U, s, V = layer_svd(W, n)
    lam = stretch_generator(s, kappa)
    np.testing.assert_allclose(lam, [np.log(np.linalg.norm(W, 2)), -kappa], atol=1e-12)
    P, lam2, Q = layer_generators(W, n, kappa)
    np.testing.assert_array_equal(lam, lam2)
    error = np.abs(reconstruct(P, lam, Q) - W).max()
    # The null direction is kept to exp(-kappa): error ~ e^-kappa, not more.
    assert 0.1 * np.exp(-kappa) <= error <= np.exp(-kappa) + 1e-12


def test_case06_nan_weight_is_refused():
    W = np.array(load_case("case06_singular_and_nan_weights.json")["with_nan"])
    assert np.isnan(W[0, 1])
    for f in (
        proper_svd,
        lambda W: layer_svd(W, 3),
        lambda W: layer_generators(W, 2, 10.0),
    ):
        with pytest.raises(ValueError, match="non-finite"):
            f(W)
    start = time.perf_counter()
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(jax.jit(lambda W: layer_generators(W, 2, 10.0))(W))
    with pytest.raises(Exception, match="non-finite"):
        jax.block_until_ready(jax.jit(proper_svd)(W))
    assert time.perf_counter() - start < 60  # bounded time, nothing hangs
