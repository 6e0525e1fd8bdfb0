"""An error certificate for `flowjax.refine`: how far the ResNet is from the plain net.

The certificate refines the net at `num_steps // 4`, `num_steps // 2` and `num_steps`,
measures the largest deviation of each ResNet from the plain net on given inputs and
fits the order `p` of `deviation ~ C num_steps^(-p)` on a log-log scale. Euler's
method has order 1 (eq. 10-13), which is what `linear="flow"` should show. With
`linear="whole"` and ReLU-family activations the refinement is exact for every
`num_steps` (eq. 56-58), so there is no order to fit; the deviation is still measured.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import jax
import numpy as np

from ._refine import refine


EXACT_FAMILY = ("relu", "leaky_relu", "identity")
ROUNDING_ULPS = 100
ORDER_SLACK = 0.25  # a fitted order outside 1 +- ORDER_SLACK gets a note


class Certificate(NamedTuple):
    """Measured deviations of refinements from their plain net.

    **Fields:**

    - `num_steps`, `deviations`: the refinements tried and `max |refined - plain|`
      of each, over all inputs and outputs.
    - `order`: the fitted log-log order, or `None` when every deviation is at the
      rounding level (or only one refinement was tried).
    - `rounding_level`: `ROUNDING_ULPS * eps * max(1, max |plain output|)`.
    - `exact_by_construction`: `linear="whole"` with ReLU-family activations.
    - `linear`, `depth`, `parameters`, `num_inputs`: what was refined and measured.
    """

    num_steps: tuple[int, ...]
    deviations: tuple[float, ...]
    order: float | None
    rounding_level: float
    exact_by_construction: bool
    linear: str
    depth: int
    parameters: int
    num_inputs: int

    @property
    def deviation(self) -> float:
        """The deviation at the requested `num_steps` (the last one)."""
        return self.deviations[-1]


def certificate_steps(num_steps: int) -> tuple[int, ...]:
    """`num_steps // 4`, `num_steps // 2` and `num_steps`, without repeats or zeros."""
    return tuple(sorted({k for k in (num_steps // 4, num_steps // 2, num_steps) if k}))


def fitted_order(num_steps: Sequence[int], deviations: Sequence[float]) -> float:
    """The order `p` of the least-squares fit `log dev = log C - p log num_steps`."""
    slope = np.polyfit(np.log(num_steps), np.log(deviations), 1)[0]
    return float(-slope)


def certify(
    mlp: eqx.nn.MLP, num_steps: int, inputs: Any, **refine_options: Any
) -> tuple[Any, Certificate]:
    """Refine `mlp` with `num_steps` and certify the result on `inputs`.

    **Arguments:** `mlp`, `num_steps` and `refine_options` as for `flowjax.refine`;
    `inputs` a batch of inputs, shape `(N, in_size)` (or `(N,)` for `'scalar'`).

    **Returns:** the refined model at `num_steps` and its `Certificate`.
    """

    plain = np.asarray(eqx.filter_jit(eqx.filter_vmap(mlp))(inputs))
    steps = certificate_steps(num_steps)
    refined, deviations = None, []
    for K in steps:
        refined = refine(mlp, K, **refine_options)
        out = np.asarray(eqx.filter_jit(eqx.filter_vmap(refined))(inputs))
        deviations.append(float(np.max(np.abs(out - plain))))
    eps = float(np.finfo(plain.dtype).eps)
    level = ROUNDING_ULPS * eps * max(1.0, float(np.max(np.abs(plain))))
    fit = len(steps) >= 2 and min(deviations) > level
    linear = refine_options.get("linear", "whole")
    return refined, Certificate(
        num_steps=steps,
        deviations=tuple(deviations),
        order=fitted_order(steps, deviations) if fit else None,
        rounding_level=level,
        exact_by_construction=linear == "whole" and _relu_family(mlp),
        linear=linear,
        depth=int(refined.depth),  # pyright: ignore[reportOptionalMemberAccess]
        parameters=parameter_count(refined),
        num_inputs=len(inputs),
    )


def _relu_family(mlp: eqx.nn.MLP) -> bool:
    from ._serialise import mlp_architecture

    try:
        arch = mlp_architecture(mlp)
    except (TypeError, ValueError):
        return False
    return {arch["activation"], arch["final_activation"]} <= set(EXACT_FAMILY)


def parameter_count(model: Any) -> int:
    """The number of stored parameters: the model's own count when it reports one,
    otherwise the entries of its floating-point arrays."""
    count = getattr(model, "num_params", None)
    if count is None:
        leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
        count = sum(leaf.size for leaf in leaves)
    return int(count)


def format_certificate(cert: Certificate, model_file: Path | str, source: str) -> str:
    """The certificate as a few lines of text for the command line."""
    lines = [
        f"refined {model_file}: linear='{cert.linear}', num_steps "
        f"{cert.num_steps[-1]}, {cert.depth} residual blocks, {cert.parameters} "
        "parameters",
        f"error certificate: max |refined - plain| over all outputs of {source}",
    ]
    lines += [
        f"  num_steps {K:>5}: {dev:.3e}"
        for K, dev in zip(cert.num_steps, cert.deviations, strict=True)
    ]
    if cert.exact_by_construction:
        lines += [
            "  exact at every num_steps: linear='whole' with ReLU-family activations",
            "  has exact blocks (theory eq. 56-58); any deviation is rounding "
            f"(level {cert.rounding_level:.1e})",
        ]
    elif cert.order is None:
        lines.append(
            f"  every deviation is at the rounding level ({cert.rounding_level:.1e}): "
            "no order to fit"
        )
    else:
        steps = ", ".join(map(str, cert.num_steps))
        lines.append(
            f"  fitted order {cert.order:.2f} over num_steps {steps} "
            "(Euler's method has order 1)"
        )
        if abs(cert.order - 1.0) > ORDER_SLACK:
            lines += [
                "  far from 1: these num_steps are not yet asymptotic (try larger N),",
                "  or the blocks are approximate ('linearized', 'newton'): their",
                "  error does not vanish as num_steps grows",
            ]
    return "\n".join(lines)
