"""A manual check of multi-process training: 2 processes x 4 CPU devices.

    .venv/bin/python tests/sharding_multiprocess.py

Not collected by pytest (it opens a port on 127.0.0.1 for `jax.distributed`'s
coordinator). Starts two processes of this file that call
`maybe_initialize_distributed(True, ...)` and `fit(..., mesh=make_mesh(model=2))`
(with a checkpoint) on one global 8-device mesh, and one process with 8 devices and no
`jax.distributed`, then prints the largest gaps between their losses, weights and
sharded evaluations (float32; JSON).
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(process_id: int, num_processes: int, port: int) -> dict:
    import jax

    from flowjax._sharding import maybe_initialize_distributed

    if num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        maybe_initialize_distributed(
            True,
            coordinator_address=f"127.0.0.1:{port}",
            num_processes=num_processes,
            process_id=process_id,
        )
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr
    import optax
    from jax.experimental import multihost_utils

    from flowjax._classifier import FlowNet
    from flowjax._sharding import evaluate_sharded, make_mesh
    from flowjax._training import fit

    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, 2)).astype(np.float32)
    y = (X[:, 0] * X[:, 1] > 0).astype(np.int32)
    net = FlowNet.init(
        2, 2, n=4, hidden=16, num_blocks=3, key=jr.key(0), dtype=jnp.float32
    )
    mesh = make_mesh(model=2)
    with tempfile.TemporaryDirectory() as folder:
        result = fit(
            net,
            optax.sgd(0.5),
            (X, y),
            batch_size=64,
            steps=4,
            key=jr.key(1),
            mesh=mesh,
            checkpoint_path=os.path.join(folder, "run.ckpt"),
        )
    params = eqx.filter(result.model.grid.params, eqx.is_array)
    params = multihost_utils.process_allgather(params, tiled=True)
    xs = jr.normal(jr.key(3), (64, 2), jnp.float32)
    outputs = evaluate_sharded(result.model, xs, mesh=make_mesh())
    outputs = multihost_utils.process_allgather(outputs, tiled=True)
    return {
        "mesh_processes": [[d.process_index for d in row] for row in mesh.devices],
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "loss": result.history.steps["loss"],
        "W1": np.asarray(params.W1).ravel().tolist(),
        "outputs": np.asarray(outputs).ravel().tolist(),
    }


def _spawn(args: list[str], devices: int) -> subprocess.Popen:
    flags = f"--xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, __file__, *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def _last_json(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=600)
    if process.returncode:
        raise RuntimeError(f"a worker failed with exit status {process.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    port = _free_port()
    workers = [_spawn([str(i), "2", str(port)], 4) for i in range(2)]
    single = _last_json(_spawn(["0", "1", "0"], 8))
    runs = [_last_json(w) for w in workers]

    def gap(name):
        return max(
            float(np.max(np.abs(np.subtract(run[name], single[name])))) for run in runs
        )

    print(
        json.dumps(
            {
                "processes": [run["processes"] for run in runs],
                "mesh_processes": runs[0]["mesh_processes"],
                "global_devices": [run["devices"] for run in runs],
                "loss_gap": gap("loss"),
                "W1_gap": gap("W1"),
                "output_gap": gap("outputs"),
            }
        )
    )


if __name__ == "__main__":
    if len(sys.argv) == 4:
        print(json.dumps(_run(*(int(a) for a in sys.argv[1:]))))
    else:
        main()
