"""The experiments (experiments/): each runs at `--scale tiny`, and its table, JSON
file, summary and figure agree with each other, with its configuration and with
bounds that hold by construction."""

import dataclasses
import json
import math
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's root

import experiments  # noqa: E402
from experiments import _common as common  # noqa: E402
from flowjax._cli import main as cli_main  # noqa: E402


NAMES = tuple(experiments.EXPERIMENTS)


def run_tiny(name: str, out: Path) -> dict:
    """Run experiment `name` at scale tiny with seed 0, writing into `out`."""
    return common.execute(experiments.load(name), "tiny", 0, out)


def config_of(name: str):
    return experiments.load(name).CONFIGS["tiny"]


def as_json(value):
    return json.loads(json.dumps(value))


def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's signature and IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND", "truncated PNG"
    return width, height


# The registry and the command lines


def test_registry_lists_every_experiment_once():
    lines = experiments.list_lines()
    assert [line.split()[0] for line in lines] == list(NAMES)
    assert len(NAMES) == 7
    for name in NAMES:
        module = experiments.load(name)
        assert module.NAME == name
        assert module.DESCRIPTION == experiments.EXPERIMENTS[name][0]
        assert set(module.CONFIGS) == {"tiny", "small", "large"}
        assert callable(module.run) and callable(module.plot)
        assert callable(module.plan)


def test_list_and_unknown_name(capsys):
    assert experiments.main(["--list"]) == 0
    assert capsys.readouterr().out.splitlines() == experiments.list_lines()
    with pytest.raises(SystemExit) as exit_:
        experiments.main(["no_such_experiment"])
    assert exit_.value.code == 2
    assert "no experiment named 'no_such_experiment'" in capsys.readouterr().err


def test_flowjax_experiment_command(capsys):
    assert cli_main(["experiment", "--list"]) == 0
    assert capsys.readouterr().out.splitlines() == experiments.list_lines()
    assert cli_main(["experiment", "no_such_experiment"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no experiment named" in err[0]


def test_out_that_is_a_file_and_a_negative_seed_are_refused_first(capsys, tmp_path):
    file = tmp_path / "taken"
    file.write_text("not a folder")
    argv = ["two_layer_blocks", "--scale", "tiny", "--out", str(file)]
    assert cli_main(["experiment", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--out {file} is not a folder" in err[0], err
    for bad in (argv, ["two_layer_blocks", "--seed", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            experiments.main(bad)
        assert exit_.value.code == 2
    assert "--seed: a seed must be between 0 and" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_flowjax_experiment_without_a_clone(capsys, monkeypatch):
    from flowjax import _experiment_cli

    monkeypatch.setattr(_experiment_cli, "experiments_root", lambda: None)
    assert cli_main(["experiment", "two_layer_blocks", "--scale", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "experiments/ folder of a clone" in err[0]


def _one_row_experiment():
    """A stand-in experiment module: one row, a verdict of `False`, no figure."""
    import types

    @dataclasses.dataclass
    class Config:
        size: int = 1

    def run(config, seed):
        verdict = common.Verdict(False, "x > 1", "x = 0.5 was measured")
        return common.Outcome(("x",), [{"x": 0.5}], {}, verdict)

    return types.SimpleNamespace(
        NAME="stand_in",
        DESCRIPTION="a stand-in",
        CLAIM="x > 1",
        CONFIGS={"tiny": Config(), "small": Config(2)},
        run=run,
        plot=lambda record, path: None,
    )


@pytest.mark.parametrize("scale", ["tiny", "small"])
def test_tiny_verdict_is_marked_a_smoke_run(scale, tmp_path):
    record = common.execute(_one_row_experiment(), scale, 0, tmp_path)
    verdict = json.loads((tmp_path / common.JSON_NAME).read_text())["verdict"]
    assert verdict == record["verdict"]
    assert verdict["supports"] is False and verdict["criterion"] == "x > 1"
    text = common.report(record, tmp_path)
    if scale == "tiny":
        assert verdict["smoke_run"] is True and verdict["note"] == common.SMOKE_NOTE
        assert "verdict: none (tiny scale: a smoke run, the verdict is not " in text
        assert "to check the code only: NOT supported: x = 0.5" in text
        assert "\nverdict: NOT supported" not in text
    else:
        assert "smoke_run" not in verdict and "note" not in verdict
        assert "\nverdict: NOT supported: x = 0.5 was measured\n" in text


# What every experiment writes


def check_files(name: str, record: dict, out: Path) -> None:
    """The JSON file is the record; the record matches the configuration; the
    figure is a readable, non-blank PNG."""
    on_disk = json.loads((out / common.JSON_NAME).read_text())
    assert on_disk == as_json(record)
    assert record["experiment"] == name and record["scale"] == "tiny"
    assert record["command"] == f"python -m experiments.{name} --scale tiny --seed 0"
    assert record["config"] == as_json(dataclasses.asdict(config_of(name)))
    assert record["rows"], "no rows"
    for row in record["rows"]:
        assert set(row) == set(record["columns"])
    assert record["verdict"]["supports"] in (True, False, None)
    assert record["verdict"]["sentence"] and record["verdict"]["criterion"]
    assert record["verdict"]["smoke_run"] is True
    assert record["wall_time_s"] > 0
    width, height = png_size(out / common.FIGURE_NAME)
    assert width >= 600 and height >= 300
    import matplotlib.image

    pixels = matplotlib.image.imread(out / common.FIGURE_NAME)
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05, "the figure is blank"


FRACTIONS = {
    "two_layer_blocks": ("test_accuracy",),
    "deeper_is_better": ("test_error",),
    "refinement": ("plain_accuracy", "refined_accuracy", "agreement"),
    "trainability": ("test_accuracy",),
    "dissipation": ("train_accuracy", "test_accuracy_mean"),
    "dimension_matching": ("test_accuracy", "flow_test_accuracy"),
    "slow_parameters": ("test_accuracy",),
}


def check_fractions(name: str, record: dict) -> None:
    values = [
        row[key]
        for row in record["rows"]
        for key in FRACTIONS[name]
        if row[key] is not None
    ]
    assert values and all(0.0 <= v <= 1.0 for v in values)


@pytest.mark.parametrize("name", NAMES)
def test_experiment_runs_and_its_outputs_agree(name, tmp_path):
    record = run_tiny(name, tmp_path)
    check_files(name, record, tmp_path)
    check_fractions(name, record)
    CHECKS[name](record, config_of(name))
    check_plan_matches_run(name, record)


def check_plan_matches_run(name: str, record: dict) -> None:
    """The dry run's plan trains the models `run` trained: same parameter counts
    (where the table reports them)."""
    if "parameters" not in record["columns"]:
        return
    dry = experiments.dry_run_experiment(name, scale="tiny", verbose=False)
    planned = sorted({c["parameters"] for c in dry["trainings"]})
    assert planned == sorted({r["parameters"] for r in record["rows"]})


# Experiment by experiment


def check_two_layer_blocks(record: dict, config) -> None:
    from experiments import two_layer_blocks as exp

    rows = record["rows"]
    assert [(r["readout"], r["block"]) for r in rows] == [
        (readout, block) for readout in config.readouts for block in exp.BLOCKS
    ]
    for readout in config.readouts:
        counts = {r["parameters"] for r in rows if r["readout"] == readout}
        assert len(counts) == 1, f"unequal parameter counts: {counts}"
    # The one-way bound holds by construction: y_1 never decreases.
    relu = exp._row(rows, "one-layer relu", "fixed")
    split = common.swap_halves(config.n_train, config.n_test, 0)
    assert relu["accuracy_bound"] == pytest.approx(exp.relu_bounds(*split.test)[0])
    assert relu["test_accuracy"] <= relu["accuracy_bound"] + 1e-6
    assert relu["train_loss"] >= relu["loss_floor"] - 1e-5
    start = np.asarray(record["series"]["start"])
    end = np.asarray(record["series"]["final_states"]["one-layer relu"])
    assert np.all(end >= start - 1e-5)


def test_one_layer_relu_blocks_only_push_up():
    from experiments import two_layer_blocks as exp

    config = exp.CONFIGS["tiny"]
    net = exp.build("one-layer relu", "fixed", config, jr.key(3))
    X = jr.normal(jr.key(4), (64, 2), jnp.float32)
    assert jax.vmap(net)(X).dtype == jnp.float32  # also with x64 switched on
    assert np.all(np.asarray(jax.vmap(net.resnet)(X)) >= np.asarray(X) - 1e-6)
    tanh = exp.build("one-layer tanh", "fixed", config, jr.key(3))
    assert np.any(np.asarray(jax.vmap(tanh.resnet)(X)) < np.asarray(X) - 1e-3)


def check_deeper_is_better(record: dict, config) -> None:
    from experiments import deeper_is_better as exp

    rows = record["rows"]
    assert [(r["variant"], r["blocks"]) for r in rows] == [
        (v, L) for v in config.variants for L in config.depths
    ]
    for r in rows:
        assert r["dt"] == pytest.approx(config.T / r["blocks"])
    for variant in config.variants:
        part = [r for r in rows if r["variant"] == variant]
        counts = [r["parameters"] for r in part]
        if variant == "per-block":
            assert counts == sorted(counts) and len(set(counts)) == len(counts)
        else:
            assert len(set(counts)) == 1
        assert record["summary"][variant] == pytest.approx(
            exp.level_off(part, config.tolerance)
        )


def test_level_off_picks_the_fewest_blocks_within_tolerance():
    from experiments.deeper_is_better import level_off

    rows = [
        {"blocks": L, "dt": 4 / L, "test_error": e}
        for L, e in ((1, 0.4), (2, 0.1), (4, 0.03), (8, 0.02), (16, 0.025))
    ]
    assert level_off(rows, 0.02) == {"blocks": 4, "dt": 1.0, "best_test_error": 0.02}


def check_refinement(record: dict, config) -> None:
    rows = record["rows"]
    assert [(r["plain_layers"], r["linear"]) for r in rows] == [
        (h + 1, linear) for h in config.hidden_layers for linear in config.linear
    ]
    for r, cert in zip(rows, record["series"]["certificates"], strict=True):
        K, h = r["num_steps"], r["plain_layers"] - 1
        assert cert["num_steps"][-1] == K
        assert r["max_deviation"] == cert["deviations"][-1]
        if r["linear"] == "whole":
            # ReLU activation blocks are exact (eq. 56-58): the same network.
            assert r["residual_blocks"] == K * h
            assert r["non_residual_maps"] == h + 1
            assert r["max_deviation"] <= cert["rounding_level"]
            assert r["agreement"] == 1.0
            assert r["refined_accuracy"] == pytest.approx(r["plain_accuracy"], abs=1e-6)
        else:
            # Four linear stages a layer, an activation stage a hidden layer.
            assert r["residual_blocks"] == 4 * K * (h + 1) + K * h
            assert r["non_residual_maps"] == 0


def check_trainability(record: dict, config) -> None:
    from experiments import trainability as exp

    rows = record["rows"]
    assert [(r["depth"], r["architecture"]) for r in rows] == [
        (d, a) for d in config.depths for a in config.architectures
    ]
    # Each further layer or block adds nearly the same number of parameters.
    first, last = config.depths[0], config.depths[-1]
    plain, res = (
        exp._pick(rows, a, last)["parameters"] - exp._pick(rows, a, first)["parameters"]
        for a in ("plain", "resnet")
    )
    assert abs(plain - res) <= 0.3 * plain
    curves = record["series"]["curves"]
    assert set(curves) == {
        f"{a} {d}" for d in config.depths for a in config.architectures
    }
    for r in rows:
        curve = curves[f"{r['architecture']} {r['depth']}"]
        assert curve["step"][0] == 1 and curve["step"][-1] == config.steps
        assert curve["loss"][0] == pytest.approx(r["initial_loss"], rel=1e-5)


def test_plain_net_has_he_initialisation():
    from experiments.trainability import plain_net

    mlp = plain_net(16, 256, jr.key(0))
    hidden = np.stack([np.asarray(layer.weight) for layer in mlp.layers[1:-1]])
    assert hidden.var() == pytest.approx(2 / 256, rel=0.05)
    assert all(np.all(np.asarray(layer.bias) == 0) for layer in mlp.layers)


def check_dissipation(record: dict, config) -> None:
    rows = record["rows"]
    expected = (
        [("neither", 0.0)]
        + [("dropout", p) for p in config.dropout_rates]
        + [("noise", e) for e in config.noise_levels]
    )
    assert [(r["variant"], r["strength"]) for r in rows] == expected
    per_seed = record["series"]["test_accuracy_per_seed"]
    neither = np.asarray(per_seed["neither 0"])
    for r in rows:
        values = np.asarray(per_seed[f"{r['variant']} {r['strength']:g}"])
        assert r["seeds"] == config.num_seeds == len(values)
        assert r["test_accuracy_mean"] == pytest.approx(values.mean())
        assert (
            r["test_accuracy_min"] <= r["test_accuracy_mean"] <= r["test_accuracy_max"]
        )
        assert r["gain_over_neither"] == pytest.approx((values - neither).mean())
    assert rows[0]["gain_over_neither"] == 0.0
    assert record["summary"]["n_train"] == 10 * config.per_class


def test_sde_without_noise_and_dropout_at_zero_are_the_resnet():
    from experiments.dissipation import CONFIGS, init_model

    model = init_model(CONFIGS["tiny"], 6, 3, jr.key(0))
    x = jr.normal(jr.key(1), (6,), jnp.float32)
    deterministic = np.asarray(model(x))
    zero = jnp.asarray(0.0, jnp.float32)
    sde = np.asarray(eqx_jit(model.sde)(x, zero, jr.key(2)))
    dropped = np.asarray(eqx_jit(model.dropout)(x, zero, jr.key(2)))
    np.testing.assert_allclose(sde, deterministic, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dropped, deterministic, rtol=1e-6, atol=1e-6)
    noisy = np.asarray(eqx_jit(model.sde)(x, jnp.asarray(0.5, jnp.float32), jr.key(2)))
    assert noisy.dtype == np.float32 and not np.allclose(noisy, deterministic)


def eqx_jit(f):
    import equinox as eqx

    return eqx.filter_jit(f)


def check_dimension_matching(record: dict, config) -> None:
    rows = record["rows"]
    assert [(r["seed"], r["n"]) for r in rows] == [
        (s, n) for s in range(config.num_seeds) for n in config.dims
    ]
    for r in rows:
        # An adaptive step at least every grid time: >= blocks steps of 6 stages.
        assert r["nfe_mean"] >= 6 * config.blocks + 1
        assert r["nfe_max"] >= r["nfe_mean"]
    regions = record["series"]["regions"]
    assert set(regions) == {str(n) for n in config.dims}
    for region in regions.values():
        assert len(region) == config.grid_points**2 and set(region) <= {0, 1}
    summary = record["summary"]
    for n in config.dims:
        mean = np.mean([r["test_accuracy"] for r in rows if r["n"] == n])
        assert summary[str(n)]["test_accuracy"] == pytest.approx(mean)


def test_annuli_are_disc_and_ring():
    split = common.annuli(500, 10, 0)
    r = np.linalg.norm(split.X_train, axis=1)
    assert np.all(r[split.y_train == 0] <= 1.0 + 1e-6)
    ring = r[split.y_train == 1]
    assert np.all((ring >= 1.5 - 1e-6) & (ring <= 2.0 + 1e-6))


def check_slow_parameters(record: dict, config) -> None:
    rows = record["rows"]
    h = config.plain_hidden_layers
    plain = rows[0]
    assert plain["family"] == "plain net" and plain["differences"] == h - 2
    for K in config.refine_steps:
        linear, activation = (
            next(
                r
                for r in rows
                if r["family"] == f"refined, {k} stages" and r["blocks"] == K
            )
            for k in ("linear", "activation")
        )
        assert linear["differences"] == 4 * (h + 1) * (K - 1)
        assert activation["differences"] == h * (K - 1)
    for L in config.resnet_blocks:
        trained = [
            r for r in rows if r["family"].startswith("ResNet") and r["blocks"] == L
        ]
        assert len(trained) == 2 and all(r["differences"] == L - 1 for r in trained)
    entries = record["series"]["deltas"]
    assert len(entries) == len(rows)
    for entry, row in zip(entries, rows, strict=True):
        assert (entry["family"], entry["blocks"]) == (row["family"], row["blocks"])
        assert len(entry["deltas"]) == row["differences"]
        if entry["deltas"]:
            assert row["median_delta"] == pytest.approx(np.median(entry["deltas"]))
            assert row["max_delta"] == pytest.approx(max(entry["deltas"]))


def test_adjacent_differences_closed_form():
    from experiments.slow_parameters import adjacent_differences

    stack = [np.array([[0.0], [1.0], [3.0]]), np.zeros((3, 2))]
    # Norms 0, 1, 3 (mean 4/3); differences 1 and 2.
    np.testing.assert_allclose(adjacent_differences(stack), [0.75, 1.5])
    assert adjacent_differences([np.ones((1, 4))]).size == 0
    assert math.isfinite(adjacent_differences([np.ones((4, 2))]).sum())


CHECKS = {
    "two_layer_blocks": check_two_layer_blocks,
    "deeper_is_better": check_deeper_is_better,
    "refinement": check_refinement,
    "trainability": check_trainability,
    "dissipation": check_dissipation,
    "dimension_matching": check_dimension_matching,
    "slow_parameters": check_slow_parameters,
}


# --dry-run: the large configurations, lowered without training


@pytest.fixture(scope="module")
def large_dry_runs() -> dict:
    return {}


def dry_run_of(name: str, cache: dict) -> dict:
    if name not in cache:
        cache[name] = experiments.dry_run_experiment(name, scale="large", verbose=False)
    return cache[name]


SLOW_DRY_RUNS = {"trainability"}  # 18 programs up to 128 unrolled layers: ~11 s


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in SLOW_DRY_RUNS else n
        for n in NAMES
    ],
)
def test_large_dry_run_figures_agree(name, large_dry_runs):
    from experiments import _dry_run

    record = dry_run_of(name, large_dry_runs)
    module = experiments.load(name)
    config = module.CONFIGS["large"]
    plan = module.plan(config)
    data = plan.data
    assert record["config"] == dataclasses.asdict(config)
    assert [c["label"] for c in record["trainings"]] == [
        t.label for t in plan.trainings
    ]
    assert len({c["label"] for c in record["trainings"]}) == len(plan.trainings)
    for check, training in zip(record["trainings"], plan.trainings, strict=True):
        params = check["parameters"]
        assert params == sum(math.prod(s) for s in check["parameter_leaves"]) > 0
        figures = check["bytes"]
        assert figures["params"] == figures["gradients"] == 4 * params  # float32
        # Adam keeps two moments per parameter and an int32 step count.
        assert figures["optimizer_state"] == 2 * figures["params"] + 4
        assert figures["data"] == data.n_train * (4 * data.features + 4)
        assert figures["activations"] > 0
        assert check["memory_bytes"] == (
            figures["data"]
            + 2 * (figures["params"] + figures["optimizer_state"])
            + figures["gradients"]
            + figures["activations"]
        )
        batch_size = min(training.options["batch_size"], data.n_train)
        assert check["batch"] == [batch_size, data.features]
        assert check["train_set"] == [data.n_train, data.features]
        assert data.n_test % check["eval_chunk"][0] == 0
        assert check["step_outputs_match"]
        assert {"loss", "data_loss", "accuracy"} <= set(check["metrics"])
        assert {"loss", "data_loss", "accuracy"} <= set(check["eval_metrics"])
    assert record["fits"] == sum(t.runs for t in plan.trainings)
    assert record["optimizer_steps"] == sum(
        t.runs * t.options["steps"] for t in plan.trainings
    )
    assert record["max_memory_bytes"] == max(
        c["memory_bytes"] for c in record["trainings"]
    )
    text = _dry_run.report(record)
    assert f"{record['fits']} fits" in text
    assert all(str(c["parameters"]) in text for c in record["trainings"])


def test_dry_run_parameter_counts_closed_form(large_dry_runs):
    """Plain ReLU MLPs 2 -> w x d -> 2 (trainability) and 64 -> 64 x h -> 10
    (refinement) have `(i + 1) w + (d - 1)(w + 1) w + (w + 1) o` parameters."""

    def mlp(i, w, d, o):
        return (i + 1) * w + (d - 1) * (w + 1) * w + (w + 1) * o

    config = experiments.load("refinement").CONFIGS["large"]
    record = dry_run_of("refinement", large_dry_runs)
    assert [c["parameters"] for c in record["trainings"]] == [
        mlp(64, config.width, h, 10) for h in config.hidden_layers
    ]
    config = experiments.load("dissipation").CONFIGS["large"]
    record = dry_run_of("dissipation", large_dry_runs)
    n, m, L = 64, config.hidden, config.blocks
    # L two-layer blocks (W1 m x n, b1, W2 n x m, b2) and a 10 x 64 readout.
    assert {c["parameters"] for c in record["trainings"]} == {
        L * (2 * m * n + m + n) + 10 * n + 10
    }


def test_digits_shape_is_the_split():
    from experiments._dry_run import DIGITS

    split = common.digits(0)
    assert (DIGITS.n_train, DIGITS.n_test) == (len(split.y_train), len(split.y_test))
    assert DIGITS.features == split.X_train.shape[1]
    assert DIGITS.classes == len(np.unique(split.y_train))


def test_dry_run_command_writes_nothing(capsys, tmp_path):
    argv = ["two_layer_blocks", "--scale", "large", "--dry-run", "--out", str(tmp_path)]
    assert experiments.main(argv) == 0
    out = capsys.readouterr().out
    assert "two_layer_blocks (large) dry run" in out and "fits" in out
    assert not any(tmp_path.iterdir())
    assert cli_main(["experiment", *argv]) == 0
    assert "dry run" in capsys.readouterr().out
