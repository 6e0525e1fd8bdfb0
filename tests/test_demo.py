"""`flowjax demo --quick`: every file is written and the numbers in them agree.

The demo runs once, in one test, so that `pytest -n 2` does not run it on both
workers; each group of checks is a helper named after what it checks.
"""

import json
from pathlib import Path

import matplotlib.image
import numpy as np

from flowjax._cli import main
from flowjax._demo import (
    FILES,
    LINEAR_OPTIONS,
    QUICK,
    TABLE_COLUMNS,
    MoonsFlow,
    format_summary,
    format_table,
    moons_record,
    plot_moons,
    read_csv_table,
    write_table,
)
from flowjax._serialise import load_model


def test_quick_demo_writes_consistent_files(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / FILES["json"]).read_text())

    check_every_file_is_written(out)
    check_csv_and_json_hold_the_same_numbers(out, record)
    check_relu_whole_rows_reproduce_the_plain_net(record)
    check_depth_grows_in_proportion_to_num_steps(record)
    check_flow_rows_converge(record)
    check_flow_model_matches_the_plain_net(record)
    check_tanh_variant(record)
    check_pngs_are_real_pictures(out)
    check_saved_model_and_inputs_reload(out, record)
    check_summary_says_where_the_files_are(out, record, printed)


def check_every_file_is_written(out):
    for name in FILES.values():
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


def check_csv_and_json_hold_the_same_numbers(out, record):
    plain, *rows = read_csv_table(out / FILES["csv"])
    assert (
        plain["model"] == "plain MLP"
        and plain["depth"] == len(record["config"]["widths"]) - 1
    )
    assert len(rows) == len(record["refine"])
    assert len(rows) == len(LINEAR_OPTIONS) * len(QUICK.num_steps)
    for csv_row, json_row in zip(rows, record["refine"], strict=True):
        assert list(csv_row) == list(TABLE_COLUMNS)
        assert csv_row["model"] == f"refine {json_row['linear']}"
        expected = {k: json_row[k] for k in TABLE_COLUMNS if k != "model"}
        assert {k: csv_row[k] for k in expected} == expected  # exact: repr floats


def check_relu_whole_rows_reproduce_the_plain_net(record):
    assert record["config"]["activation"] == "relu"
    whole = [r for r in record["refine"] if r["linear"] == "whole"]
    assert [r["num_steps"] for r in whole] == list(QUICK.num_steps)
    for row in whole:
        assert row["agreement"] == 1.0
        assert row["max_abs_logit_diff"] <= 1e-5
        assert row["test_accuracy"] == record["plain"]["test_accuracy"]


def check_depth_grows_in_proportion_to_num_steps(record):
    # A 64-16-10 ReLU net: "whole" has K ReLU blocks in its hidden layer; "flow" has
    # 4 K linear blocks per layer plus those K ReLU blocks (no identity blocks).
    blocks_per_step = {"whole": 1, "flow": 4 * 2 + 1}
    for linear in LINEAR_OPTIONS:
        for row in (r for r in record["refine"] if r["linear"] == linear):
            assert row["depth"] == blocks_per_step[linear] * row["num_steps"], row


def check_flow_rows_converge(record):
    flow = [r for r in record["refine"] if r["linear"] == "flow"]
    errors = [r["max_abs_logit_diff"] for r in flow]
    assert errors[-1] < errors[0]
    for row in flow:
        assert 0.0 <= row["agreement"] <= 1.0
        assert row["forward_ms"] > 0 and row["parameters"] > 0


def check_flow_model_matches_the_plain_net(record):
    flow = record["flow_model"]
    assert flow["inputs"] == QUICK.flow_inputs
    assert flow["agreement"] == 1.0
    assert flow["max_abs_logit_diff"] < 1e-3
    assert flow["steps_mean"] > 0


def check_tanh_variant(record):
    variant = record["variant"]
    assert variant["activation"] == "tanh"
    assert 0.5 < variant["test_accuracy"] <= 1.0
    assert variant["refine_max_abs_logit_diff"] <= 1e-4  # exact blocks, float32


def check_pngs_are_real_pictures(out):
    for key in ("convergence", "moons"):
        image = matplotlib.image.imread(out / FILES[key])
        assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 400
        assert float(np.std(image[..., :3])) > 0.05, key  # not a blank canvas


def check_saved_model_and_inputs_reload(out, record):
    mlp, header = load_model(out / FILES["model"])
    X = np.load(out / FILES["inputs"])
    assert X.shape == (record["config"]["test_size"], 64) and X.dtype == np.float32
    assert header["architecture"]["width_size"] == QUICK.width
    logits = np.asarray([mlp(x) for x in X[:20]])
    assert logits.shape == (20, 10)


def check_summary_says_where_the_files_are(out, record, printed):
    summary = format_summary(record, out)
    assert summary in printed
    assert str(out.resolve()) in summary
    for name in FILES.values():
        assert name in summary
    assert len(summary.splitlines()) <= 24  # one screen


# The table, summary and picture on a made-up record (no demo run)


def made_up_record():
    def row(linear, K, depth, diff):
        return {
            "linear": linear,
            "num_steps": K,
            "depth": depth,
            "depth_unit": "residual blocks",
            "parameters": 100 + K,
            "test_accuracy": 0.9,
            "agreement": 0.95,
            "max_abs_logit_diff": diff,
            "forward_ms": 0.5,
        }

    return {
        "config": {
            "seed": 0,
            "activation": "relu",
            "quick": False,
            "widths": [64, 16, 10],
            "train_size": 1347,
            "test_size": 450,
            "flow_rtol": 1e-6,
        },
        "plain": {
            "test_accuracy": 0.973,
            "train_accuracy": 1.0,
            "depth": 2,
            "depth_unit": "layers",
            "parameters": 1530,
            "forward_ms": 0.125,
            "train_seconds": 1.5,
        },
        "flow_model": {
            "inputs": 450,
            "max_abs_logit_diff": 5e-4,
            "agreement": 1.0,
            "test_accuracy": 0.973,
            "steps_mean": 466.2,
            "steps_max": 500,
            "seconds": 9.0,
        },
        "rounding_level": 1e-4,
        "refine": [
            row("whole", 1, 1, 0.0),
            row("whole", 2, 2, 0.0),
            row("flow", 1, 9, 9.6e2),
            row("flow", 2, 18, 7.8e2),
        ],
        "variant": {
            "activation": "tanh",
            "test_accuracy": 0.976,
            "refine_num_steps": 8,
            "refine_max_abs_logit_diff": 1e-6,
        },
        "moons": moons_record(made_up_moons()),
        "seconds": 110.0,
    }


def made_up_moons(num_layers=2, points_per_stage=3):
    """A `MoonsFlow` whose last stages spread over [-16, 2.5] (tick labels that
    run together at matplotlib's default tick count)."""
    states = 5 * num_layers * points_per_stage + 1
    rng = np.random.default_rng(0)
    path = rng.standard_normal((8, states, 3))
    path[:, -2 * points_per_stage - 1 :, 0] *= 8.0
    return MoonsFlow(
        labels=np.arange(8) % 2,
        times=np.linspace(0.0, num_layers, states),
        states=path,
        points_per_stage=points_per_stage,
        num_layers=num_layers,
        n=3,
        accuracy=0.88,
        widths=(2, 2, 2),
        sigma_names=("relu", "identity"),
    )


def test_csv_has_the_plain_row_first(tmp_path):
    record = made_up_record()
    write_table(tmp_path, record)
    plain, *rows = read_csv_table(tmp_path / FILES["csv"])
    assert plain == {
        "model": "plain MLP",
        "linear": None,
        "num_steps": None,
        "depth": 2,
        "depth_unit": "layers",
        "parameters": 1530,
        "test_accuracy": 0.973,
        "agreement": None,
        "max_abs_logit_diff": None,
        "forward_ms": 0.125,
    }
    assert [r["model"] for r in rows] == ["refine whole"] * 2 + ["refine flow"] * 2
    assert [r["depth_unit"] for r in rows] == ["residual blocks"] * 4
    assert [r["depth"] for r in rows] == [r["depth"] for r in record["refine"]]


def test_printed_table_says_what_depth_counts():
    lines = format_table(made_up_record()).splitlines()
    plain = next(line for line in lines if line.startswith("plain MLP"))
    assert " 2 layers " in plain
    assert "  1 block  " in next(
        line for line in lines if line.startswith("refine whole")
    )
    assert " 9 blocks " in next(
        line for line in lines if " 1 " in line and "flow" in line
    )
    assert (
        "depth: the plain net's layers, the refined ResNets' residual blocks"
        in lines[-1]
    )
    width = len(lines[0])
    assert all(len(line) <= width for line in lines[1:-1]), (
        "a row is wider than the head"
    )


def test_summary_gives_mean_and_largest_solver_steps_and_the_moons_dimension():
    record = made_up_record()
    assert "ambient dimension n of its flow" in record["moons"]["description"]
    assert record["moons"]["flow_dimension"] == 3 and "n" not in record["moons"]
    summary = format_summary(record, Path("out"))
    assert "solver steps per input: mean 466, largest 500" in summary
    assert "(max 500)" not in summary
    assert "a flow in R^3" in summary


def test_moons_panels_have_at_most_five_ticks(tmp_path):
    fig = plot_moons(made_up_moons(), tmp_path / "moons.png", "relu", dpi=30)
    for ax in fig.axes:
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            inside = [t for t in axis.get_majorticklocs() if lo <= t <= hi]
            assert 2 <= len(inside) <= 5, (ax.get_title(), inside)
