"""The benchmark suite (`python -m experiments.benchmarks`) in its tiny configuration.

Each section runs once (module-scoped) and its reports are checked for internal
consistency: the ratio column is the quotient of the two time columns, the status
follows the target, the sides agree numerically, and the Markdown shows every row.
"""

import json
import math

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.benchmarks import __main__ as bench, adaptive
from experiments.benchmarks._harness import (
    TimingSettings,
    fitted_exponent,
    status_of,
    time_calls,
    update_readme,
)


def _run(tmp_path_factory, section: str) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp(f"bench{section}")
    assert bench.main(["--tiny", "--only", section, "--out", str(out)]) == 0
    payload = json.loads((out / "results.json").read_text())
    return payload, (out / "results.md").read_text()


@pytest.fixture(scope="module")
def euler_run(tmp_path_factory):
    return _run(tmp_path_factory, "1")


@pytest.fixture(scope="module")
def adaptive_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("torchdiffeq")
    return _run(tmp_path_factory, "2")


@pytest.fixture(scope="module")
def refine_run(tmp_path_factory):
    return _run(tmp_path_factory, "3")


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory):
    return _run(tmp_path_factory, "4")


def _check_rows(payload: dict, markdown: str, expected_rows: int) -> list[dict]:
    rows = payload["rows"]
    assert len(rows) == expected_rows
    for row in rows:
        assert row["flowjax_s"] > 0 and row["other_s"] > 0
        assert math.isclose(row["ratio"], row["flowjax_s"] / row["other_s"])
        assert row["status"] == status_of(row["ratio"], row["target"])
        assert row["runs"] >= 3
        assert row["flowjax"] and row["other"] and row["shapes"]
        assert f"{row['ratio']:.3g}" in markdown
        assert row["shapes"] in markdown
    meta = payload["meta"]
    assert meta["config"] == "tiny"
    assert meta["cpu"] in markdown and str(meta["cores"]) in markdown
    assert len(meta["load_average_start"]) == 3
    assert meta["versions"]["jax"] == jax.__version__
    return rows


def test_euler_rows_agree_and_count_flops(euler_run):
    payload, markdown = euler_run
    # 3 pairs forward, 4 with the backward pass (checkpointed ResNet vs diffrax)
    rows = _check_rows(payload, markdown, expected_rows=7)
    assert "### 1. Fixed-step Euler ResNet" in markdown
    for row in rows:
        extra = row["extra"]
        assert math.isclose(
            extra["gflops_flowjax"], extra["flops"] / row["flowjax_s"] / 1e9
        )
        assert math.isclose(
            extra["gflops_other"], extra["flops"] / row["other_s"] / 1e9
        )
        if "max_abs_diff" in extra:  # the same Euler steps, in float32
            assert extra["max_abs_diff"] <= 1e-5
    # forward+backward counts three times the forward's flops.
    forward, backward = rows[0]["extra"]["flops"], rows[3]["extra"]["flops"]
    assert backward == 3 * forward == 3 * 4 * 2 * 4 * 8 * 4


def test_adaptive_rows_agree_with_torchdiffeq(adaptive_run):
    payload, markdown = adaptive_run
    # Tsit5 in tiny: the neural ODE, the flow model by solve_batch and by vmap.
    rows = _check_rows(payload, markdown, expected_rows=3)
    for row in rows:
        ours, theirs = row["extra"]["flowjax"], row["extra"]["other"]
        assert ours["nfe"] > 0 and theirs["nfe"] > 0
        # Equal tolerances rtol 1e-5, atol 1e-7 in float32: the two solutions
        # agree to the tolerance, not to rounding.
        assert ours["max_abs_diff"] <= 1e-3
        if row["benchmark"] == "flow model":
            assert ours["max_abs_error_vs_mlp"] <= 1e-3
            assert theirs["max_abs_error_vs_mlp"] <= 1e-3


def test_nfe_rule_matches_a_counter():
    """diffrax's Tsit5 evaluates the field 6 times a step attempt, plus once."""
    cfg = adaptive.TINY
    p, Y0 = adaptive.neural_ode_problem(cfg)
    calls = []

    def counted(t, Y, p):
        jax.debug.callback(lambda: calls.append(1))
        return adaptive.batched_field(t, Y, p)

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(counted),
        diffrax.Tsit5(),
        0.0,
        1.0,
        None,
        Y0,
        args=p,
        stepsize_controller=diffrax.PIDController(rtol=cfg.rtol, atol=cfg.atol),
    )
    jax.block_until_ready(sol.ys)
    assert sol.stats is not None
    assert len(calls) == adaptive.nfe_from_steps(int(sol.stats["num_steps"]))


def test_refine_rows_and_exponents(refine_run):
    payload, markdown = refine_run
    rows = _check_rows(payload, markdown, expected_rows=2)
    exponents = payload["meta"]["exponents"]
    assert all(math.isfinite(exponents[k]) for k in ("flowjax", "scipy"))
    assert "Fitted growth with width" in markdown
    # Both pipelines rebuild the embedded layer from their generators (eq. 22);
    # SciPy's logm may not near a rotation by pi, so only ours is bounded here.
    errors = rows[0]["extra"]["reconstruction_error"]
    assert errors["flowjax"] <= 1e-4


def test_forward_rows_and_storage(forward_run):
    payload, markdown = forward_run
    rows = _check_rows(payload, markdown, expected_rows=4)
    for row in rows:
        if "whole" in row["benchmark"]:
            assert row["extra"]["error"] == 0.0  # ReLU blocks are exact (eq. 56-58)
            assert row["target"] == 1.3
    storage = payload["meta"]["storage"]
    assert [s["K"] for s in storage] == [1, 4]
    assert storage[-1]["untied"] > storage[-1]["tied"]
    assert "untied / tied" in markdown


def test_time_calls_takes_the_median_of_bounded_rounds():
    calls = []
    settings = TimingSettings(warmup=2, min_runs=3, max_runs=4, budget_s=10.0)
    times = time_calls([lambda: calls.append("a"), lambda: calls.append("b")], settings)
    assert [t.runs for t in times] == [4, 4]
    # 2 warm-up rounds, then 4 timed rounds, each starting at the next call.
    assert calls == ["a", "b"] * 2 + ["a", "b", "b", "a"] * 2
    calls.clear()
    time_calls(
        [lambda: calls.append("a"), lambda: calls.append("b")],
        TimingSettings(warmup=1, min_runs=3, max_runs=3),
        warm=(True, False),
    )
    assert calls == ["a"] + ["a", "b", "b", "a", "a", "b"]


def test_fitted_exponent_recovers_a_power_law():
    widths = [64, 128, 256, 512]
    assert math.isclose(fitted_exponent(widths, [3e-9 * w**2.5 for w in widths]), 2.5)


def test_readme_block_is_replaced(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nend\n")
    update_readme(readme, "new table")
    assert readme.read_text() == (
        "intro\n<!-- results:start -->\nnew table\n<!-- results:end -->\nend\n"
    )
    (tmp_path / "bare.md").write_text("no markers")
    with pytest.raises(ValueError, match="results:start"):
        update_readme(tmp_path / "bare.md", "x")


def test_float32_problems():
    p, Y0 = adaptive.neural_ode_problem(adaptive.TINY)
    assert p.W1.dtype == Y0.dtype == jnp.float32
    assert np.asarray(Y0).shape == (adaptive.TINY.B, adaptive.TINY.n)
