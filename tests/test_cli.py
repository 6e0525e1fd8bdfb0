"""The command line: help, one-line errors, and the model file round trip."""

import json
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowjax._cli import all_commands, main
from flowjax._serialise import MAGIC, load_model, read_header, save_mlp


def small_mlp(activation=jax.nn.relu, seed=0) -> eqx.nn.MLP:
    return eqx.nn.MLP(
        5, 3, 8, 2, activation=activation, dtype=jnp.float32, key=jax.random.key(seed)
    )


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mlp.fjx"
    save_mlp(path, small_mlp())
    return path


def run(argv, capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of `flowjax argv`, in this process."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *fragments):
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# Help


def test_top_level_help_lists_every_command(capsys):
    status, out, _ = run(["--help"], capsys)
    assert status == 0
    for name in ("demo", "refine", "save-example-model"):
        assert name in out
    assert "exit status: 0 done; 2 a mistake in the command" in " ".join(out.split())


@pytest.mark.parametrize("command", sorted(all_commands()))
def test_each_command_has_help(command, capsys):
    status, out, _ = run([command, "--help"], capsys)
    assert status == 0
    assert out.startswith(f"usage: flowjax {command}")
    assert "exit status: 0 done; 2" in " ".join(out.split())


def test_python_dash_m_runs_the_cli():
    result = subprocess.run(
        [sys.executable, "-m", "flowjax", "refine", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--num-steps" in result.stdout


# Bad options


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["demo", "--bogus"], "flowjax demo: error: unrecognized option --bogus"),
        (["--bogus"], "flowjax: error: unrecognized option --bogus"),
        (["--bogus"], "one of: demo, refine, save-example-model"),
        (["refine", "--wrong", "x"], "flowjax refine: error: unrecognized option"),
        (["refine", "--wrong", "x"], "--wrong; valid options: --help, --inputs"),
        (["refine", "m.fjx", "--num-steps=2", "--out", "r", "--x=1"], "option --x;"),
        (["demo", "--seed", "-3", "--bogus"], "unrecognized option --bogus;"),
        (["demo", "--activation", "softmax"], "invalid choice: 'softmax'"),
        (["refine", "m.fjx", "--out", "r.fjx"], "--num-steps"),
        (["refine", "m.fjx", "--num-steps", "0", "--out", "r.fjx"], ">= 1, got 0"),
        (["refine", "m.fjx", "--num-steps", "2.5", "--out", "r.fjx"], "whole number"),
        (["nonsense"], "invalid choice: 'nonsense'"),
        (["demo", "--seed", "-1"], "between 0 and 4294967295 (2**32 - 1), got -1"),
        (["demo", "--seed", "1.5"], "--seed: expected a whole number, got '1.5'"),
        (["refine", "m", "--num-steps=1", "--out=r", f"--seed={2**32}"], "got 4294"),
        (["save-example-model", "m.fjx", "--seed", "-7"], "got -7"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_options_give_one_line(argv, fragment, capsys):
    status, _, err = run(argv, capsys)
    assert status == 2
    assert_one_line_error(status, err, fragment)


# Bad model files


def _corrupt(path, how):
    data = path.read_bytes()
    end = data.index(b"\n", len(MAGIC))
    header = json.loads(data[len(MAGIC) : end])
    if how == "truncated":
        return data[: len(data) - 100]
    if how == "not a model file":
        return b"\x93NUMPY" + data
    if how == "bad json":
        return data[: len(MAGIC)] + b"{not json\n" + data[end + 1 :]
    if how == "flipped byte":
        return data[:-5] + bytes([data[-5] ^ 1]) + data[-4:]
    if how == "wrong architecture":
        header["architecture"]["width_size"] = 9  # the payload holds width 8
        return (
            data[: len(MAGIC)] + json.dumps(header).encode() + b"\n" + data[end + 1 :]
        )
    if how == "unknown activation":
        header["architecture"]["activation"] = "swish"
        return (
            data[: len(MAGIC)] + json.dumps(header).encode() + b"\n" + data[end + 1 :]
        )
    if how == "empty":
        return b""
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("truncated", "is truncated"),
        ("not a model file", "is not a flowjax model file"),
        ("bad json", "not valid JSON"),
        ("flipped byte", "SHA-256"),
        ("wrong architecture", "shape (9, 5)"),
        ("unknown activation", "'swish'"),
        ("empty", "is not a flowjax model file"),
    ],
)
def test_broken_model_file_gives_one_line(how, fragment, model_file, tmp_path, capsys):
    broken = tmp_path / "broken.fjx"
    broken.write_bytes(_corrupt(model_file, how))
    out = tmp_path / "refined.fjx"
    argv = ["refine", str(broken), "--num-steps", "2", "--out", str(out)]
    status, _, err = run(argv, capsys)
    assert status == 2
    assert_one_line_error(status, err, "flowjax refine: error:", str(broken), fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    "name, fragment", [("nowhere.fjx", "does not exist."), (".", "is a folder")]
)
def test_missing_model_file_gives_one_line(name, fragment, tmp_path, capsys):
    path = tmp_path / name
    argv = ["refine", str(path), "--num-steps", "2", "--out", str(tmp_path / "r")]
    status, _, err = run(argv, capsys)
    assert status == 2
    assert "Errno" not in err
    assert_one_line_error(
        status, err, f"flowjax refine: error: model file '{path}' {fragment}"
    )


def test_broken_file_in_a_real_process_has_no_traceback(model_file, tmp_path):
    broken = tmp_path / "broken.fjx"
    broken.write_bytes(_corrupt(model_file, "truncated"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowjax",
            "refine",
            str(broken),
            "--num-steps",
            "2",
            "--out",
            str(tmp_path / "r.fjx"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is truncated" in result.stderr


@pytest.mark.parametrize(
    "inputs, fragment",
    [(np.zeros((4, 6), np.float32), "shape (4, 6)"), (np.zeros(5), "shape (5,)")],
)
def test_inputs_of_the_wrong_shape_give_one_line(
    inputs, fragment, model_file, tmp_path, capsys
):
    path = tmp_path / "inputs.npy"
    np.save(path, inputs)
    argv = [
        "refine",
        str(model_file),
        "--num-steps",
        "2",
        "--inputs",
        str(path),
        "--out",
        str(tmp_path / "r.fjx"),
    ]
    status, _, err = run(argv, capsys)
    assert status == 2
    assert_one_line_error(status, err, fragment, "(N, 5)")


def _nan_inputs():
    X = np.zeros((4, 5), np.float32)
    X[2, 3], X[3, 0] = np.nan, np.inf
    return X


@pytest.mark.parametrize(
    "inputs, fragments",
    [
        (
            _nan_inputs(),
            [
                "2 non-finite value(s) (NaN or inf), the first at row 2, column 3",
                "needs finite numbers",
            ],
        ),
        (np.zeros((0, 5), np.float32), ["no inputs", "shape (0, 5)", "N >= 1"]),
        (None, ["--inputs file", "does not exist"]),
    ],
)
def test_inputs_that_cannot_be_certified_give_one_line(
    inputs, fragments, model_file, tmp_path, capsys
):
    path = tmp_path / "inputs.npy"
    if inputs is not None:
        np.save(path, inputs)
    argv = ["refine", str(model_file), "--num-steps", "2", "--inputs", str(path)]
    status, _, err = run([*argv, "--out", str(tmp_path / "r.fjx")], capsys)
    assert status == 2
    assert_one_line_error(status, err, str(path), *fragments)
    assert not (tmp_path / "r.fjx").exists()


def test_bogus_option_in_a_real_process_has_no_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "flowjax", "--bogus"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(result.returncode, result.stderr, "--bogus", "refine")


def test_abbreviated_and_negative_values_are_not_unknown_options(capsys):
    # argparse accepts prefixes of options and negative numbers as values: -1
    # reaches the seed's check, not the unknown-option one.
    status, _, err = run(["demo", "--se", "-1", "--activation", "relu"], capsys)
    assert_one_line_error(status, err, "argument --seed", "got -1")
    assert "unrecognized" not in err


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"x,y\n1,2\n", "does not start with the .npy header"),
        (b"", "it is empty"),
    ],
)
def test_inputs_that_are_not_npy_name_the_file(
    content, fragment, model_file, tmp_path, capsys
):
    path = tmp_path / "inputs.csv"
    path.write_bytes(content)
    out = tmp_path / "r.fjx"
    argv = ["refine", str(model_file), "--num-steps", "2", "--inputs", str(path)]
    status, _, err = run([*argv, "--out", str(out)], capsys)
    assert status == 2
    assert_one_line_error(
        status, err, f"--inputs {path} is not a NumPy .npy", fragment, "(N, 5)"
    )
    assert not out.exists()


def test_object_npy_inputs_name_the_file(model_file, tmp_path, capsys):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    argv = ["refine", str(model_file), "--num-steps", "2", "--inputs", str(path)]
    status, _, err = run([*argv, "--out", str(tmp_path / "r.fjx")], capsys)
    assert_one_line_error(status, err, str(path), "Python objects, not numbers")


def test_out_in_a_missing_folder_names_the_folder(model_file, tmp_path, capsys):
    out = tmp_path / "missing" / "r.fjx"
    argv = ["refine", str(model_file), "--num-steps", "2", "--out", str(out)]
    status, _, err = run(argv, capsys)
    assert status == 2
    assert_one_line_error(
        status, err, f"the folder {out.parent} does not exist", "mkdir -p"
    )
    assert ".tmp" not in err
    assert not out.parent.exists()


def test_out_that_is_a_folder_is_refused(model_file, tmp_path, capsys):
    argv = ["refine", str(model_file), "--num-steps", "2", "--out", str(tmp_path)]
    status, _, err = run(argv, capsys)
    assert_one_line_error(status, err, f"--out {tmp_path} is a folder")


@pytest.mark.parametrize("inside", [False, True])
def test_demo_out_that_is_a_file_is_refused_first(inside, tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("not a folder")
    out = file / "sub" if inside else file
    status, stdout, err = run(["demo", "--quick", "--out", str(out)], capsys)
    assert status == 2
    assert_one_line_error(
        status, err, f"flowjax demo: error: --out {out} is not a folder"
    )
    assert "Errno" not in err and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_save_example_model_checks_its_folders_first(tmp_path, capsys):
    missing = tmp_path / "missing"
    status, _, err = run(["save-example-model", str(missing / "m.fjx")], capsys)
    assert_one_line_error(status, err, f"the folder {missing} does not exist")
    argv = ["save-example-model", str(tmp_path / "m.fjx"), "--inputs"]
    status, _, err = run([*argv, str(missing / "x.npy")], capsys)
    assert_one_line_error(status, err, "--inputs", f"the folder {missing}")
    assert not (tmp_path / "m.fjx").exists()


def test_refined_file_is_refused_as_refine_input(model_file, tmp_path, capsys):
    refined = tmp_path / "refined.fjx"
    assert (
        run(
            ["refine", str(model_file), "--num-steps", "2", "--out", str(refined)],
            capsys,
        )[0]
        == 0
    )
    status, _, err = run(
        ["refine", str(refined), "--num-steps", "2", "--out", str(tmp_path / "x.fjx")],
        capsys,
    )
    assert_one_line_error(status, err, "kind 'refined'")


# Round trip: save -> refine -> load


def test_model_file_round_trip_keeps_every_weight(model_file):
    model, header = load_model(model_file)
    assert header["kind"] == "mlp"
    original = small_mlp()
    for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(original), strict=True):
        if eqx.is_array(a):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("linear", ["whole", "flow"])
def test_save_refine_load_round_trip(linear, model_file, tmp_path, capsys):
    from flowjax._refine import refine

    inputs = np.random.default_rng(0).standard_normal((32, 5)).astype(np.float32)
    np.save(tmp_path / "x.npy", inputs)
    out = tmp_path / "refined.fjx"
    argv = [
        "refine",
        str(model_file),
        "--num-steps",
        "8",
        "--linear",
        linear,
        "--inputs",
        str(tmp_path / "x.npy"),
        "--out",
        str(out),
    ]
    status, stdout, err = run(argv, capsys)
    assert status == 0, err
    assert "all outputs of 32 inputs from" in stdout
    if linear == "whole":
        assert "exact at every num_steps" in stdout
    else:
        assert "fitted order" in stdout

    loaded, header = load_model(out)
    assert header["kind"] == "refined"
    assert header["refine"]["num_steps"] == 8 and header["refine"]["linear"] == linear
    mlp = small_mlp()
    expected = jax.vmap(refine(mlp, 8, linear=linear))(jnp.asarray(inputs))
    np.testing.assert_array_equal(jax.vmap(loaded)(jnp.asarray(inputs)), expected)
    plain = jax.vmap(mlp)(jnp.asarray(inputs))
    tol = 1e-5 if linear == "whole" else 1.0
    assert float(jnp.max(jnp.abs(expected - plain))) <= tol
    assert read_header(out)["architecture"] == read_header(model_file)["architecture"]


def test_float64_model_file_round_trip(tmp_path, capsys):
    mlp64 = eqx.nn.MLP(3, 2, 4, 1, dtype=jnp.float64, key=jax.random.key(1))
    path = tmp_path / "m64.fjx"
    save_mlp(path, mlp64)
    out = tmp_path / "r64.fjx"
    status, stdout, err = run(
        ["refine", str(path), "--num-steps", "4", "--out", str(out)], capsys
    )
    assert status == 0, err
    loaded, header = load_model(out)
    assert header["architecture"]["dtype"] == "float64"
    x = jnp.ones(3, jnp.float64)
    assert loaded(x).dtype == jnp.float64
    np.testing.assert_allclose(loaded(x), mlp64(x), rtol=1e-12, atol=1e-12)


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "m.fjx"
    save_mlp(path, small_mlp(seed=1))
    save_mlp(path, small_mlp(seed=2))  # replaces the file
    assert [p.name for p in tmp_path.iterdir()] == ["m.fjx"]
    loaded, _ = load_model(path)
    np.testing.assert_array_equal(
        loaded.layers[0].weight, small_mlp(seed=2).layers[0].weight
    )


def test_readme_command_line_section_lists_every_option():
    from pathlib import Path

    from flowjax._cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    subparsers = next(
        a
        for a in build_parser()._actions
        if a.__class__.__name__ == "_SubParsersAction"
    )
    for name, parser in subparsers.choices.items():
        assert f"flowjax {name}" in section, name
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert option in section, f"flowjax {name} {option}"
    assert "Exit status: 0" in section and "2 for a mistake" in section
