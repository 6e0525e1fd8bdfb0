"""Linear algebra of a plain layer as a flow (sec. 3.2, eq. 19-23).

A layer `x -> W x + b` with `W` of shape `(m, d)` is embedded in `R^n` (eq. 19),
factored as `W_hat = U diag(s) V` with `U, V` in `SO(n)`, and written with
generators: `U = expm(P)`, `V = expm(Q)` (eq. 20) and `diag(s) ~ expm(diag(lam))`
(eq. 21-22).

Everything here runs under `jax.jit` and `jax.vmap` on CPU, GPU and TPU: the only
decompositions used are `jnp.linalg.eigh` and `jnp.linalg.svd` of real matrices.
Checks that depend on values raise `ValueError` for concrete arrays and use
`eqx.error_if` for traced ones.
"""

import math
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, ArrayLike, Bool, Float


_PAD_REMEDY = (
    "embed the layer in one more dimension: flowjax pads automatically when it "
    "builds a flow model"
)


def _mm(a: Array, b: Array) -> Array:
    """Matrix product at full precision (no TF32 or bfloat16 passes on accelerators)."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _antisym(A: Array) -> Array:
    """The skew-symmetric part `(A - A^T) / 2`; exactly skew in floating point."""
    return (A - A.T) / 2


def _is_traced(*xs) -> bool:
    return any(isinstance(x, Tracer) for x in xs)


def _as_float_array(x: ArrayLike) -> Array:
    """`x` as a JAX array with a floating dtype (integers are promoted)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def _zero_tol(s: Float[Array, " k"], size: int) -> Float[Array, ""]:
    """Singular values `s_j <= size * eps * s_max` count as zero (all, if `W = 0`)."""
    return size * jnp.finfo(s.dtype).eps * jnp.max(s)


def _finite_or_error(W: Array, where: str) -> Array:
    """`W` itself, refused when it has a NaN or infinite entry.

    Concrete `W`: `ValueError` naming the first bad index. Traced `W`: an
    `eqx.error_if` check, and the returned array has the bad entries replaced by 0
    so that no decomposition downstream ever sees them (bounded time).
    """
    if not _is_traced(W):
        bad = np.argwhere(~np.isfinite(np.asarray(W)))
        if len(bad):
            entries = "entry" if len(bad) == 1 else "entries"
            first = tuple(int(i) for i in bad[0])
            raise ValueError(
                f"{where}: W has {len(bad)} non-finite {entries} (NaN or inf), the "
                f"first at index {first}; weights must be finite."
            )
        return W
    finite = jnp.all(jnp.isfinite(W))
    W = eqx.error_if(
        W,
        ~finite,
        f"{where}: W has non-finite entries (NaN or inf); weights must be finite.",
    )
    return jnp.where(finite, W, 0)


def _negative_det_message(n: int, det: float | None) -> str:
    value = "det W < 0" if det is None else f"det W = {det:.6g} < 0"
    return (
        f"W is square ({n}x{n}), of full rank and has {value}: no factorisation "
        f"W = U diag(s) V with U, V in SO({n}) exists (eq. 19). Remedy: "
        f"{_PAD_REMEDY}."
    )


def _host_negative_det(W: np.ndarray) -> bool:
    """Whether a concrete square `W` is of full rank with `det W < 0` (host side)."""
    n = W.shape[0]
    s = np.linalg.svd(W, compute_uv=False)
    full_rank = s[-1] > n * np.finfo(W.dtype).eps * s[0] and s[0] > 0
    return bool(full_rank and np.linalg.slogdet(W)[0] < 0)


def _refuse_negative_det(W: Array, U: Array, negative: Array) -> Array:
    """`U`, refused (`ValueError` / `eqx.error_if`) when `W` has no proper SVD."""
    n = W.shape[0]
    if _is_traced(negative):
        return eqx.error_if(U, negative, _negative_det_message(n, None))
    if bool(negative):
        det = float(np.linalg.det(np.asarray(W, np.float64)))
        raise ValueError(_negative_det_message(n, det))
    return U


# ---------------------------------------------------------------------------------
# Proper SVD and embedding (eq. 19)
# ---------------------------------------------------------------------------------


def _det_sign(X: Float[Array, "n n"]) -> Float[Array, ""]:
    return jnp.sign(jnp.linalg.det(X))


def _flip_column(U: Array, j: Array | int, flip: Array) -> Array:
    """`U` with column `j` negated where `flip`."""
    sign = jnp.where((jnp.arange(U.shape[1]) == j) & flip, -1, 1).astype(U.dtype)
    return U * sign[None, :]


def proper_svd(
    W: Float[ArrayLike, "n n"],
) -> tuple[Float[Array, "n n"], Float[Array, " n"], Float[Array, "n n"]]:
    """An SVD `W = U diag(s) V` with `U, V` in `SO(n)` (eq. 19).

    Note `V`, not `V^T`. Starts from `jnp.linalg.svd`; the determinants are fixed
    with the sign freedom of the factors: when `det U det V = -1` and some `s_j` is
    numerically zero (`s_j <= n eps s_max`), column `j` of `U` is negated (the last
    such `j`); when both determinants are then -1, column `n-1` of `U` and row
    `n-1` of `V` are negated together. A square, full-rank `W` with `det W < 0` has
    no such factorisation.

    **Arguments:**

    - `W`: a square matrix of shape `(n, n)`.

    **Returns:** `(U, s, V)` with `s` descending and `>= 0`, `det U = det V = +1`.

    **Raises:** `ValueError` for a non-square or non-finite `W`, or a full-rank `W`
    with `det W < 0` (remedy: one more dimension, see `embedding_dim`); for traced
    `W` the last two are `eqx.error_if` checks, raised when the program runs.
    """
    W = _as_float_array(W)
    if W.ndim != 2 or W.shape[0] != W.shape[1]:
        raise ValueError(
            f"proper_svd needs a square matrix, got shape {W.shape}; embed a layer "
            "of shape (m, d) first (embed_layer, layer_svd)."
        )
    W = _finite_or_error(W, "proper_svd")
    U, s, V, negative = _proper_svd_core(W)
    U = _refuse_negative_det(W, U, negative)
    return U, s, V


@jax.jit
def _proper_svd_core(W: Float[Array, "n n"]) -> tuple[Array, Array, Array, Array]:
    U, s, V = jnp.linalg.svd(W)
    n = s.shape[0]
    zero = s <= _zero_tol(s, n)
    has_zero = jnp.any(zero)
    j_zero = n - 1 - jnp.argmax(zero[::-1])
    det_U, det_V = _det_sign(U), _det_sign(V)
    # A zero singular value makes column j of U free: fix the product of dets.
    flip = (det_U * det_V < 0) & has_zero
    U = _flip_column(U, j_zero, flip)
    det_U = jnp.where(flip, -det_U, det_U)
    # Both -1: negate a column of U and the matching row of V together.
    both = (det_U < 0) & (det_V < 0)
    U = _flip_column(U, n - 1, both)
    V = _flip_column(V.T, n - 1, both).T
    negative = (det_U * det_V < 0) & ~has_zero
    return U, s, V, negative


def embed_layer(
    W: Float[ArrayLike, "m d"], b: Float[ArrayLike, " m"], n: int
) -> tuple[Float[Array, "n n"], Float[Array, " n"]]:
    """Zero-pad a layer into `R^n`: `W` in the top-left block, `b` on top (eq. 19).

    **Arguments:**

    - `W`: weight of shape `(m, d)`.
    - `b`: bias of shape `(m,)`.
    - `n`: the ambient dimension, `n >= max(m, d)`.

    **Returns:** `(W_hat, b_hat)` of shapes `(n, n)` and `(n,)`.

    **Raises:** `ValueError` when the shapes do not match or `n` is too small.
    """
    W, b = _as_float_array(W), _as_float_array(b)
    m, d = _check_layer_shape(W, n, "embed_layer")
    if b.shape != (m,):
        raise ValueError(
            f"embed_layer: b has shape {b.shape}, but W of shape {W.shape} needs a "
            f"bias of shape ({m},)."
        )
    W_hat = jnp.zeros((n, n), W.dtype).at[:m, :d].set(W)
    b_hat = jnp.zeros((n,), b.dtype).at[:m].set(b)
    return W_hat, b_hat


def _check_layer_shape(W: Array, n: int, where: str) -> tuple[int, int]:
    if W.ndim != 2:
        raise ValueError(f"{where}: W must be a matrix (m, d), got shape {W.shape}.")
    m, d = W.shape
    if not isinstance(n, (int, np.integer)) or n < max(m, d):
        raise ValueError(
            f"{where}: the ambient dimension n={n} must be an integer >= "
            f"max(m, d) = {max(m, d)} for W of shape {W.shape}."
        )
    return m, d


def embedding_dim(
    widths: Sequence[int], weights: Sequence[Float[ArrayLike, "m d"]] | None = None
) -> int:
    """The ambient dimension `n` for a net with layer widths `(d_0, ..., d_L)`.

    `n = max(widths)`, plus one only when needed (eq. 19): when a layer maps
    `R^n -> R^n` with a full-rank `W` of `det W < 0`, no proper SVD exists in `n`
    dimensions, and one more padding dimension provides a zero singular value.
    With concrete `weights` the determinant signs decide (computed on the host, at
    trace time). Without `weights`, or when any of them is traced (inside `jit` or
    `vmap`, where the values are unknown), it is conservative: one is added
    whenever a square layer of the largest width exists.

    **Arguments:**

    - `widths`: `(d_0, ..., d_L)`; layer `l` maps `R^{d_l} -> R^{d_{l+1}}`.
    - `weights`: optional `W_l` of shapes `(d_{l+1}, d_l)`.

    **Returns:** the ambient dimension `n`.

    **Raises:** `ValueError` for fewer than two widths, a width below 1, weights
    that do not match the widths, or non-finite concrete weights.
    """
    widths = tuple(widths)
    if len(widths) < 2 or not all(
        isinstance(w, (int, np.integer)) and w >= 1 for w in widths
    ):
        raise ValueError(
            f"embedding_dim: widths must be two or more positive integers "
            f"(d_0, ..., d_L), got {widths}."
        )
    n = int(max(widths))
    square = [i for i in range(len(widths) - 1) if widths[i] == widths[i + 1] == n]
    if weights is not None:
        weights = list(weights)
        _check_weights(widths, weights)
    if not square:
        return n
    if weights is None or _is_traced(*(weights[i] for i in square)):
        return n + 1
    for i in square:
        W = np.asarray(weights[i])
        if not np.issubdtype(W.dtype, np.floating):
            W = W.astype(np.float64)
        if _host_negative_det(W):
            return n + 1
    return n


def _check_weights(widths: tuple[int, ...], weights: list) -> None:
    if len(weights) != len(widths) - 1:
        raise ValueError(
            f"embedding_dim: {len(widths)} widths need {len(widths) - 1} weights, "
            f"got {len(weights)}."
        )
    for i, W in enumerate(weights):
        expected = (widths[i + 1], widths[i])
        if tuple(np.shape(W)) != expected:
            raise ValueError(
                f"embedding_dim: weight {i} has shape {tuple(np.shape(W))}, but "
                f"widths {widths} need {expected}."
            )
        if not _is_traced(W) and not np.all(np.isfinite(np.asarray(W))):
            raise ValueError(
                f"embedding_dim: weight {i} has non-finite entries (NaN or inf); "
                "weights must be finite."
            )


def _pad_identity(B: Float[Array, "k k"], n: int) -> Float[Array, "n n"]:
    """`B` in the top-left block of the `n x n` identity."""
    k = B.shape[0]
    return jnp.eye(n, dtype=B.dtype).at[:k, :k].set(B)


class _Completion(eqx.Module):
    """The Procrustes completion of the free columns of an orthogonal `B`.

    The free columns (not `keep`) span the complement of the kept ones. The
    orthonormal basis of that complement closest (Frobenius) to the identity
    columns at the free positions is `B_free O` with `O = polar(B_free^T E_free)`
    (orthogonal Procrustes). `parity` is the determinant of the completed matrix;
    negating the weakest singular direction of `O` (as in the Kabsch algorithm)
    flips it at the least cost in that distance.
    """

    B: Array
    Uz: Array
    Vzt: Array
    parity: Array

    def matrix(self, keep: Array, flip: Array) -> Array:
        n = self.B.shape[0]
        rotation = _mm(_flip_column(self.Uz, n - 1, flip), self.Vzt)
        return jnp.where(keep[None, :], self.B, _mm(self.B, rotation))


def _completion(B: Float[Array, "n n"], keep: Bool[Array, " n"]) -> _Completion:
    free = ~keep
    Z = B.T * (free[:, None] & free[None, :])  # B_free^T E_free, padded with zeros
    Z = Z + jnp.diag(jnp.where(keep, 2.0, 0.0).astype(B.dtype))  # kept block: 2 I
    Uz, _, Vzt = jnp.linalg.svd(Z)
    # Singular values of the free block are <= 1 < 2, so the last one is its
    # smallest whenever a free column exists.
    parity = _det_sign(B) * _det_sign(Uz) * _det_sign(Vzt)
    return _Completion(B, Uz, Vzt, parity)


def _rotation_cost(U: Float[Array, "n n"]) -> tuple[Array, Array]:
    """Whether the rotation `U` turns a plane by pi (to rounding), and its energy.

    The energy is `sum_j theta_j^2 = |log U|_F^2` over its eigenvalues
    `exp(+-i theta_j)`, read off the eigenvalues `cos(theta_j)` of the symmetric
    part (each rotation plane counted twice).
    """
    c = jnp.linalg.eigvalsh((U + U.T) / 2)
    eps = jnp.finfo(U.dtype).eps
    return c[0] < -1 + jnp.sqrt(eps), jnp.sum(jnp.arccos(jnp.clip(c, -1, 1)) ** 2)


def _proper_factors(
    U: Float[Array, "n n"], V: Float[Array, "n n"], keep: Bool[Array, " n"]
) -> tuple[Float[Array, "n n"], Float[Array, "n n"], Array]:
    """`U, V` in `SO(n)` from orthogonal `U, V`, keeping `U diag(s) V`.

    The freedom: the sign of each pair `(u_j, v_j)` with `s_j > 0` (`keep`), and
    any orthogonal change of the free columns of `U` and free rows of `V`. Signs
    make `U_jj + V_jj >= 0`; free bases are Procrustes fits to the identity
    columns. A wrong determinant is then fixed either by Kabsch flips alone or by
    negating the pair with the smallest `U_jj + V_jj` first. A Kabsch flip inside
    a rigid block (free columns that are exactly identity columns) creates a
    rotation by exactly pi; the option with fewer of those wins, and among equals
    the one with the smaller rotation energy `|log U|^2 + |log V|^2`.
    Returns `(U, V, negative)`, `negative` where no choice gives
    `det U = det V = 1` (a full-rank square `W` with `det W < 0`).
    """
    sign = jnp.where(keep & (jnp.diagonal(U) + jnp.diagonal(V) < 0), -1, 1)
    U, V = U * sign.astype(U.dtype)[None, :], V * sign.astype(V.dtype)[:, None]
    left, right = _completion(U, keep), _completion(V.T, keep)
    j = jnp.argmin(jnp.where(keep, jnp.diagonal(U) + jnp.diagonal(V), jnp.inf))
    has_free = jnp.any(~keep)
    neg_U, neg_V = left.parity < 0, right.parity < 0

    def candidate(flip_pair: Array) -> tuple[Array, Array, Array, Array]:
        flip_U, flip_V = neg_U != flip_pair, neg_V != flip_pair
        feasible = has_free | (~flip_U & ~flip_V)
        U_c = _flip_column(left.matrix(keep, flip_U), j, flip_pair)
        V_c = _flip_column(right.matrix(keep, flip_V), j, flip_pair).T
        pi_U, energy_U = _rotation_cost(U_c)
        pi_V, energy_V = _rotation_cost(V_c)
        n_pi = jnp.where(feasible, pi_U.astype(int) + pi_V.astype(int), 3)
        return U_c, V_c, n_pi, energy_U + energy_V

    U_a, V_a, n_pi_a, energy_a = candidate(jnp.array(False))
    U_b, V_b, n_pi_b, energy_b = candidate(jnp.any(keep))
    take_b = (n_pi_b < n_pi_a) | ((n_pi_b == n_pi_a) & (energy_b < energy_a))
    U = jnp.where(take_b, U_b, U_a)
    V = jnp.where(take_b, V_b, V_a)
    return U, V, (n_pi_a == 3) & (n_pi_b == 3)


def layer_svd(
    W: Float[ArrayLike, "m d"], n: int
) -> tuple[Float[Array, "n n"], Float[Array, " n"], Float[Array, "n n"]]:
    """A proper SVD `W_hat = U diag(s) V` of the embedded layer, `U, V` in `SO(n)`.

    `W_hat` is `W` zero-padded to `n x n` (eq. 19). The SVD of the small `m x d`
    matrix gives the singular vectors of the nonzero singular values; the columns
    of `U` (rows of `V`) where `s_j = 0` are free, and are chosen as the
    orthonormal bases closest to the identity columns at their positions
    (orthogonal Procrustes). Each pair `(u_j, v_j)` gets the sign that makes
    `U_jj + V_jj >= 0`, and a wrong determinant is fixed inside that freedom, the
    way that avoids rotations by exactly pi and otherwise keeps
    `|log U|^2 + |log V|^2` small. This removes the rotations by pi that an
    arbitrary null-space basis brings in (`theory.md`, numerical fact 2); the one
    left is forced: a square, full-rank `W` with `det W < 0` padded once has a
    rotation by pi in `U` or in `V`. Whenever `n > min(m, d)` or `W` is singular,
    some `s_j = 0` and `det U = det V = +1` always holds; for a square, full-rank
    `W` with `n = m = d` it has the guarantees of `proper_svd`. Not
    differentiable with respect to `W` (JAX differentiates only thin SVDs).

    **Arguments:**

    - `W`: weight of shape `(m, d)`.
    - `n`: the ambient dimension, `n >= max(m, d)`.

    **Returns:** `(U, s, V)` of shapes `(n, n)`, `(n,)`, `(n, n)`; `s` descending.

    **Raises:** `ValueError` for a bad shape or `n`, a non-finite `W`, or (only when
    `n = m = d`) a full-rank `W` with `det W < 0`; for traced `W` the value checks
    are `eqx.error_if` checks.
    """
    W = _as_float_array(W)
    m, d = _check_layer_shape(W, n, "layer_svd")
    W = _finite_or_error(W, "layer_svd")
    U, s, V, negative = _layer_svd_core(W, n)
    if n == m == d:
        U = _refuse_negative_det(W, U, negative)
    return U, s, V


@jax.jit(static_argnums=1)
def _layer_svd_core(
    W: Float[Array, "m d"], n: int
) -> tuple[Array, Array, Array, Array]:
    m, d = W.shape
    U_small, s_small, V_small = jnp.linalg.svd(W)
    U, V = _pad_identity(U_small, n), _pad_identity(V_small, n)
    s = jnp.zeros((n,), W.dtype).at[: s_small.shape[0]].set(s_small)
    keep = s > _zero_tol(s, max(m, d))
    U, V, negative = _proper_factors(U, V, keep)
    return U, s, V, negative


# ---------------------------------------------------------------------------------
# Rotation logarithm (eq. 20)
# ---------------------------------------------------------------------------------


def _theta_over_sin(c: Float[Array, " n"]) -> Float[Array, " n"]:
    """`g(c) = theta / sin(theta)` for `c = cos(theta)`, `theta` in `[0, pi)`.

    Smooth on `(-1, 1]` with `g(1) = 1`. Both `theta = atan2(sin, c)` and
    `sin = sqrt((1 - c)(1 + c))` come from the same `c`, so their quotient is
    accurate to rounding even where `theta` itself is not (`c` near 1). Callers
    keep `c >= -0.95`, away from the pole at `c = -1`.
    """
    sin = jnp.sqrt((1 - c) * (1 + c))
    positive = sin > 0
    sin_safe = jnp.where(positive, sin, 1)
    return jnp.where(positive, jnp.arctan2(sin_safe, c) / sin_safe, 1)


def _split_point(c: Float[Array, " n"]) -> Float[Array, ""]:
    """A cosine `c_thr` in `[-0.9, 0.9]` in the widest gap of the sorted `c`.

    Eigenvalues of `S` below `c_thr` (angles near pi) are handled through `-R`.
    Splitting in the widest gap keeps every rotation plane (a pair of equal `c`)
    on one side, and the spectral projector well conditioned.
    """
    lo, hi = -0.9, 0.9
    points = jnp.concatenate(
        [jnp.full((1,), lo, c.dtype), jnp.clip(c, lo, hi), jnp.full((1,), hi, c.dtype)]
    )
    gaps = jnp.diff(points)
    i = jnp.argmax(gaps)
    return (points[i] + points[i + 1]) / 2


def _complex_structure(
    T: Float[Array, "n n"], inside: Bool[Array, " n"]
) -> Float[Array, "n n"]:
    """A complex structure `J` on the coordinates `inside`, oriented like `T`.

    `T` is real skew, zero outside the block `inside x inside`, and normal: on each
    of its invariant planes it is `sin(theta) J_0` with `J_0` a rotation by pi/2.
    The result is skew with `J^2 = -I` on the block and 0 elsewhere; it commutes
    with `T` to rounding. Where `sin(theta)` is well above rounding, `J = J_0`
    (the polar factor of `T`); where it is not, `J` pairs up a basis of the
    remaining subspace, which is as good as any choice there.
    """
    n = T.shape[0]
    eps = float(jnp.finfo(T.dtype).eps)
    block = inside[:, None] & inside[None, :]
    # Partial polar factor of T on singular values above rounding. A threshold that
    # splits a degenerate pair leaves half of a plane; the repair below fixes it.
    U, sigma, Vt = jnp.linalg.svd(T)
    J_part = _mm(U * (sigma > max(n, 16) * eps), Vt)
    J_part = jnp.where(block, _antisym(J_part), 0)
    # Repair: the polar factor of J_part on its range (singular values 1 or 1/2).
    # Coordinates outside the block get eigenvalue 2 so they separate cleanly.
    D = _mm(J_part.T, J_part) + jnp.diag(jnp.where(inside, 0.0, 2.0).astype(T.dtype))
    d, Z = jnp.linalg.eigh((D + D.T) / 2)
    on_range = (d > 1 / 16) & (d < 1.5)
    scale = jnp.where(on_range, 1 / jnp.sqrt(jnp.where(on_range, d, 1)), 0)
    J = _mm(J_part, _mm(Z * scale, Z.T))
    # The rest of the block (T ~ 0 there, angle pi to rounding): pair eigenvectors.
    free = d < 1 / 16
    half = 2 * (n // 2)
    Za, Zb = Z[:, 0:half:2], Z[:, 1:half:2]
    paired = free[0:half:2] & free[1:half:2]
    J_free = _mm(Zb * paired, Za.T) - _mm(Za * paired, Zb.T)
    return jnp.where(block, _antisym(J + J_free), 0)


@jax.jit
def _skew_log_impl(R: Float[Array, "n n"]) -> Float[Array, "n n"]:
    finite = jnp.all(jnp.isfinite(R))
    A = _finite_skew_log(jnp.where(finite, R, jnp.eye(R.shape[0], dtype=R.dtype)))
    return jnp.where(finite, A, jnp.nan)


def _finite_skew_log(R: Float[Array, "n n"]) -> Float[Array, "n n"]:
    S = (R + R.T) / 2
    K = _antisym(R)
    c, Y = jnp.linalg.eigh(S)
    M = _antisym(_mm(Y.T, _mm(K, Y)))  # K in the eigenbasis of S
    # On a rotation plane of angle theta, S = cos(theta) I and K = sin(theta) J_0.
    # Away from pi: log R = g(S) K. Near pi (c < c_thr): log R = log(-R) + pi J
    # with log(-R) = g(-S) (-K) and J a complex structure commuting with it.
    inside = c < _split_point(c)
    w = jnp.where(
        inside,
        -_theta_over_sin(jnp.maximum(-c, -0.95)),
        _theta_over_sin(jnp.maximum(c, -0.95)),
    )
    same_side = inside[:, None] == inside[None, :]
    L = jnp.where(same_side, M * (w[:, None] + w[None, :]) / 2, 0)
    T = jnp.where(inside[:, None] & inside[None, :], M, 0)
    L = L + math.pi * _complex_structure(T, inside)
    return _antisym(_mm(Y, _mm(L, Y.T)))


def _half_cot(delta: Array) -> Array:
    """`(delta / 2) cot(delta / 2)`, with its limit 1 at `delta = 0`.

    It has poles at `delta = +-2 pi`; there it returns large finite values.
    """
    h = delta / 2
    small = jnp.abs(h) < 1e-4
    h_safe = jnp.where(small, 1, h)
    sin = jnp.sin(h_safe)
    tiny = jnp.finfo(delta.dtype).tiny
    sin = jnp.where(jnp.abs(sin) < tiny, tiny, sin)
    return jnp.where(small, 1 - h**2 / 3, h_safe * jnp.cos(h_safe) / sin)


@jax.jit
def _skew_log_tangent(
    R: Float[Array, "n n"], A: Float[Array, "n n"], dR: Float[Array, "n n"]
) -> Float[Array, "n n"]:
    """The derivative of the principal logarithm at `R = expm(A)` along `dR`.

    With `X = R^T dR`, `dA = psi(ad_A)(X)` for `psi(x) = x / (1 - exp(-x))`, the
    inverse of the derivative of `expm` (left-trivialised). On the eigenvectors of
    the Hermitian `H = i A` with eigenvalues `mu`, `ad_A` acts as `-i (mu_j - mu_k)`
    and `psi(-i delta) = (delta/2) cot(delta/2) - i delta/2`, so
    `dA = a(ad_H)(X) + [A, X]/2` with `a(delta) = (delta/2) cot(delta/2)`. `a(ad_H)`
    is evaluated on the real symmetric form `[[0, -A], [A, 0]]` of `H` (no complex
    dtypes). Undefined at angle pi (`delta = 2 pi`), where it is large.
    """
    n = A.shape[0]
    X = _antisym(_mm(R.T, dR))  # tangent space of SO(n) at R, left-trivialised
    zeros = jnp.zeros_like(A)
    G = jnp.block([[zeros, -A], [A, zeros]])
    mu, Z = jnp.linalg.eigh(G)
    X2 = jnp.block([[X, zeros], [zeros, X]])
    F = _half_cot(mu[:, None] - mu[None, :])
    Y2 = _mm(Z, _mm(F * _mm(Z.T, _mm(X2, Z)), Z.T))
    E = (Y2[:n, :n] + Y2[n:, n:]) / 2 + (_mm(A, X) - _mm(X, A)) / 2
    return _antisym(E)


def _rotation_tol(n: int, dtype) -> float:
    """The tolerance `sqrt(n eps)` on `max |R^T R - I|` for a rotation in `dtype`.

    Half the working digits, so that rounding never trips it: measured defects are
    at most `4 sqrt(n) eps` for the factors of `layer_svd` (float32, n <= 512) and
    up to `~1e3 sqrt(n) eps` for `scipy.linalg.expm` of large angles (float64,
    n = 3), against `sqrt(n eps)` = `1.5e-8 sqrt(n)` (float64), `3.5e-4 sqrt(n)`
    (float32). A matrix that is not a rotation is off by far more.
    """
    return math.sqrt(n * float(jnp.finfo(dtype).eps))


_ROTATION_ALLOWED = "skew_log takes a rotation: R^T R = I (to rounding), det R = +1"


def _check_rotation_shape(R: Array) -> None:
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(
            f"skew_log needs a square matrix of shape (n, n), got shape {R.shape}; "
            f"{_ROTATION_ALLOWED}. Map over a batch with jax.vmap."
        )


def _host_rotation_check(R: np.ndarray) -> None:
    """`ValueError` when the concrete `R` is not a rotation, naming what is wrong."""
    n = R.shape[0]
    bad = np.argwhere(~np.isfinite(R))
    if len(bad):
        first = tuple(int(i) for i in bad[0])
        raise ValueError(
            f"skew_log: R has {len(bad)} non-finite entries (NaN or inf), the first "
            f"at index {first}; {_ROTATION_ALLOWED}."
        )
    R64 = R.astype(np.float64)
    defect = float(np.abs(R64.T @ R64 - np.eye(n)).max())
    tol = _rotation_tol(n, R.dtype)
    if defect > tol:
        raise ValueError(
            f"skew_log: R is not orthogonal, max |R^T R - I| = {defect:.3g} > "
            f"{tol:.3g} = sqrt(n eps); {_ROTATION_ALLOWED}."
        )
    det = float(np.linalg.det(R64))
    if det <= 0:
        raise ValueError(
            f"skew_log: R has det R = {det:.6g}, a reflection has no real "
            f"logarithm; {_ROTATION_ALLOWED} (fix a sign, see proper_svd)."
        )


def _traced_rotation_check(R: Array) -> Array:
    """`R`, with `eqx.error_if` checks that it is a finite rotation (at run time).

    The checks cost one matrix product and one LU factorisation, a fraction of the
    `eigh` they guard, and are not differentiated.
    """
    n = R.shape[0]
    X = jax.lax.stop_gradient(R)
    finite = jnp.all(jnp.isfinite(X))
    X = jnp.where(finite, X, jnp.eye(n, dtype=X.dtype))
    defect = jnp.max(jnp.abs(_mm(X.T, X) - jnp.eye(n, dtype=X.dtype)))
    orthogonal = defect <= _rotation_tol(n, X.dtype)
    R = eqx.error_if(
        R,
        ~finite,
        f"skew_log: R has non-finite entries (NaN or inf); {_ROTATION_ALLOWED}.",
    )
    R = eqx.error_if(
        R,
        finite & ~orthogonal,
        "skew_log: R is not orthogonal, max |R^T R - I| exceeds sqrt(n eps); "
        f"{_ROTATION_ALLOWED}.",
    )
    return eqx.error_if(
        R,
        finite & orthogonal & (jnp.linalg.det(X) <= 0),
        "skew_log: R has det R = -1, a reflection has no real logarithm; "
        f"{_ROTATION_ALLOWED} (fix a sign, see proper_svd).",
    )


def skew_log(R: Float[ArrayLike, "n n"]) -> Float[Array, "n n"]:
    """A real logarithm of a rotation: skew `A` with `expm(A) = R` (eq. 20).

    The principal logarithm (rotation angles in `(-pi, pi]`) where it is unique;
    at an angle of exactly pi (to rounding) one of the valid real logarithms. `A`
    is exactly skew (`A + A^T == 0`).

    Method: `S = (R + R^T)/2` and `K = (R - R^T)/2` commute, and on a rotation plane
    of angle `theta` they are `cos(theta) I` and `sin(theta) J_0`. So
    `log R = g(S) K` with `g(cos t) = t / sin t`, evaluated on the eigenvectors of
    `S`. Where `cos(theta)` is near -1 (split off in the widest gap of the spectrum
    of `S`), `log R = log(-R) + pi J` with `log(-R) = g(-S)(-K)` and `J` a complex
    structure oriented like `K`. Only `eigh`, `svd` and matrix products are used.

    The derivative is that of the principal logarithm along the rotation group
    (the tangent `dR` is projected onto the tangent space at `R`); it is finite at
    the identity and undefined at angle pi, where it is large.

    **Arguments:**

    - `R`: a rotation, shape `(n, n)`, `R^T R = I`, `det R = 1`.

    **Returns:** `A`, skew, shape `(n, n)`, of the dtype of `R`.

    **Raises:** `ValueError` for a shape other than `(n, n)`, and for a concrete `R`
    with a NaN or infinite entry, with `max |R^T R - I| > sqrt(n eps)`, or with
    `det R <= 0`. For a traced `R` (under `jit`, `vmap`, `grad`) the value checks
    are `eqx.error_if` checks, raised when the program runs; with
    `EQX_ON_ERROR=nan` a non-finite `R` gives NaN in bounded time.
    """
    R = _as_float_array(R)
    _check_rotation_shape(R)
    if _is_traced(R):
        R = _traced_rotation_check(R)
    else:
        _host_rotation_check(np.asarray(R))
    return _skew_log(R)


@jax.custom_jvp
def _skew_log(R: Float[Array, "n n"]) -> Float[Array, "n n"]:
    return _skew_log_impl(R)


@_skew_log.defjvp
def _skew_log_jvp(primals, tangents):
    (R,), (dR,) = primals, tangents
    A = _skew_log(R)
    return A, _skew_log_tangent(R, A, _as_float_array(dR))


# ---------------------------------------------------------------------------------
# Stretch generator and the generators of a layer (eq. 21-22)
# ---------------------------------------------------------------------------------


def _check_kappa(kappa: float | Array) -> None:
    if _is_traced(kappa):
        return
    value = float(np.asarray(kappa))
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"kappa={value} is not allowed: kappa must be a positive finite number "
            "(the stretch -kappa stands in for a zero singular value, eq. 21)."
        )


def stretch_generator(s: Float[ArrayLike, " n"], kappa: float) -> Float[Array, " n"]:
    """The stretch generator `lam` with `exp(lam) ~ s` (eq. 21).

    `lam_j = log s_j` where `s_j` is numerically nonzero (`s_j > n eps max(s)`),
    and `lam_j = -kappa` where it is zero: the projection on a null direction
    becomes a contraction by `exp(-kappa)` (eq. 22). No `-inf` or NaN, in values
    or gradients (the gradient is 0 on the zero entries).

    **Arguments:**

    - `s`: singular values, shape `(n,)`, `>= 0`.
    - `kappa`: a positive finite number.

    **Returns:** `lam` of shape `(n,)`.

    **Raises:** `ValueError` if `kappa` is not a positive finite number.
    """
    _check_kappa(kappa)
    s = _as_float_array(s)
    nonzero = s > _zero_tol(s, s.shape[0])
    s_safe = jnp.where(nonzero, s, 1)  # double where: no log(0) in the gradient
    return jnp.where(nonzero, jnp.log(s_safe), -jnp.asarray(kappa, s.dtype))


def layer_generators(
    W: Float[ArrayLike, "m d"], n: int, kappa: float
) -> tuple[Float[Array, "n n"], Float[Array, " n"], Float[Array, "n n"]]:
    """The generators `(P, lam, Q)` of the embedded layer (eq. 20-22).

    `W_hat ~ expm(P) diag(exp(lam)) expm(Q)`, exactly on the directions with
    nonzero singular values and up to `exp(-kappa)` on the null directions, where
    `W_hat` is `W` zero-padded to `n x n` and `U = expm(P)`, `V = expm(Q)` come from
    `layer_svd`.

    **Arguments:**

    - `W`: weight of shape `(m, d)`.
    - `n`: the ambient dimension (see `embedding_dim`).
    - `kappa`: a positive finite number, the stretch `-kappa` of null directions.

    **Returns:** `(P, lam, Q)`: skew `(n, n)`, `(n,)`, skew `(n, n)`.

    **Raises:** as `layer_svd` and `stretch_generator`. Not differentiable with
    respect to `W` (see `layer_svd`).
    """
    _check_kappa(kappa)
    U, s, V = layer_svd(W, n)
    return skew_log(U), stretch_generator(s, kappa), skew_log(V)
