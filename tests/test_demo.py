"""`flowjax demo --quick`: every file is written and the numbers in them agree.

The demo runs once, in one test, so that `pytest -n 2` does not run it on both
workers; each group of checks is a helper named after what it checks.
"""

import json

import matplotlib.image
import numpy as np

from flowjax._cli import main
from flowjax._demo import (
    FILES,
    LINEAR_OPTIONS,
    QUICK,
    TABLE_COLUMNS,
    format_summary,
    read_csv_table,
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
    rows = read_csv_table(out / FILES["csv"])
    assert len(rows) == len(record["refine"])
    assert len(rows) == len(LINEAR_OPTIONS) * len(QUICK.num_steps)
    for csv_row, json_row in zip(rows, record["refine"], strict=True):
        assert list(csv_row) == list(TABLE_COLUMNS)
        assert csv_row == {k: json_row[k] for k in TABLE_COLUMNS}  # exact: repr floats


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
