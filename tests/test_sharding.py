"""Sharding on 8 fake CPU devices: specs derived from names, sharded ≡ unsharded training through the
CLI, a real two-process run joined with jax.distributed, and the documented errors for bad meshes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import env, micro_cfg, train_args, xla_flags
from jax.sharding import PartitionSpec as P
from tolerances import F32_GRAD, SHARDED_VS_SINGLE_LOSS

import jscale
from jscale import mesh, optim, sharding
from jscale.cli import main as cli_main
from jscale.config import ConfigError
from jscale.core import loss_fn, make_init_state, make_layout

# `tiny` for 12 steps, every step logged, one evaluation at the end, a checkpoint at step 6.
TINY12 = ["train.steps=12", "train.log_every=1", "train.eval_every=0", "train.eval_batches=1",
          "train.checkpoint_every=6"]
LAYOUTS = {"data=8": ["mesh.data=8"], "fsdp=8": ["mesh.fsdp=8"],
           "data=2,fsdp=2,tensor=2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]}


def _tiny(*overrides: str):
    return micro_cfg(TINY12 + list(overrides))


def _train_args(out: Path, *overrides: str) -> list[str]:
    return train_args(out, TINY12, *overrides)


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """`tiny` trained on one device (the default mesh) through the CLI: its output directory."""
    out = tmp_path_factory.mktemp("single")
    assert cli_main(_train_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def single_losses(single_run):
    """Per-step losses of the one-device run."""
    return _losses(single_run)


# --- specs derived from names -------------------------------------------------------------------------

EXPECTED = {  # leaf -> PartitionSpec, written out by hand from the rules table for each layout
    "data=8": {"w_q_LDHK": P(), "w_o_LHKD": P(), "w_down_LFD": P(), "table_VD": P(),
               "scale_D": P()},
    "fsdp=8": {"w_q_LDHK": P(None, "fsdp"), "w_k_LDGK": P(None, "fsdp"),
               "w_o_LHKD": P(None, None, None, "fsdp"), "w_gate_LDF": P(None, "fsdp"),
               "w_down_LFD": P(None, None, "fsdp"), "table_VD": P(None, "fsdp"),
               "scale_LD": P(None, "fsdp"), "scale_D": P("fsdp")},
    "data=2,fsdp=2,tensor=2": {
        "w_q_LDHK": P(None, "fsdp", "tensor"), "w_k_LDGK": P(None, "fsdp", "tensor"),
        "w_v_LDGK": P(None, "fsdp", "tensor"), "w_o_LHKD": P(None, "tensor", None, "fsdp"),
        "w_gate_LDF": P(None, "fsdp", "tensor"), "w_up_LDF": P(None, "fsdp", "tensor"),
        "w_down_LFD": P(None, "tensor", "fsdp"),
        "table_VD": P(None, "fsdp"),  # V = 257 does not divide by 2: the vocab stays replicated
        "scale_LD": P(None, "fsdp"), "scale_D": P("fsdp")},
}


def _by_name(tree) -> dict[str, list]:
    out: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.setdefault(sharding._leaf_name(path), []).append(leaf)
    return out


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_state_shardings_follow_the_rules(layout_name):
    cfg = _tiny(*LAYOUTS[layout_name])
    layout = make_layout(cfg)
    optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
    state = make_init_state(cfg, optimizer, layout)()
    params, moments = _by_name(state.params), _by_name(state.opt_state)
    for name, spec in EXPECTED[layout_name].items():
        for leaf in params[name] + moments[name]:  # Adam's mu and nu are sharded like the param
            assert leaf.sharding.spec == spec, (name, leaf.sharding.spec)
            assert len(leaf.sharding.device_set) == 8
    for leaf in moments["count"] + jax.tree.leaves(state.opt_state.hyperparams) + [state.step]:
        assert leaf.sharding.is_fully_replicated
    # Per-device bytes of parameters + optimizer state: 1/fsdp of the whole (up to the replicated
    # odd-sized vocab table dim and scalars), times 1/tensor for the tensor-sharded weights.
    leaves = jax.tree.leaves((state.params, state.opt_state))
    total = sum(x.nbytes for x in leaves)
    per_device = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    sizes = layout.axis_sizes
    expected = total / sizes["fsdp"]
    assert per_device <= expected * 1.01
    assert per_device >= total / (sizes["fsdp"] * sizes["tensor"]) * 0.99


def test_mamba_specs_and_sharded_gradients_equal_unsharded():
    cfg = jscale.presets.get("mamba-tiny").override(
        {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.batch_size": 4,
         "train.seq_len": 32, "model.d_model": 64, "model.n_layers": 1})
    layout = make_layout(cfg)
    params = jscale.models.init(jax.random.PRNGKey(0), cfg.model)
    specs = _by_name(sharding.tree_specs(params, layout.mesh))
    assert specs["w_in_x_LDF"] == [P(None, "fsdp", "tensor")]
    assert specs["w_out_LFD"] == [P(None, "tensor", "fsdp")]
    assert specs["a_log_LFN"] == [P(None, "tensor")]
    assert specs["w_dt_LJF"] == [P(None, None, "tensor")]  # J: the Δ rank
    assert specs["w_conv_LWF"] == [P(None, None, "tensor")]
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 33), 0, 257)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def loss(p, b):
        return loss_fn(p, b, cfg.model)[0]
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params, batch)
    shardings = sharding.tree_shardings(params, layout.mesh)
    sharded = jax.jit(sharding.traced_under(layout, jax.value_and_grad(loss)),
                      in_shardings=(shardings, layout.batch_sharding()),
                      out_shardings=(layout.replicated(), shardings))
    got_loss, got_grads = sharded(params, batch)
    np.testing.assert_allclose(got_loss, ref_loss, **SHARDED_VS_SINGLE_LOSS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_GRAD),
                 got_grads, ref_grads)
    assert got_grads["layers"]["mixer"]["w_in_x_LDF"].sharding.spec == P(None, "fsdp", "tensor")


def test_no_layout_means_no_constraints():
    """The single-device path is the unsharded program: no sharding constraint is traced."""
    cfg = _tiny()
    assert make_layout(cfg) is None
    params = jax.eval_shape(lambda: jscale.models.init(jax.random.PRNGKey(0), cfg.model))
    batch = {"inputs": jnp.zeros((2, 8), jnp.int32), "targets": jnp.zeros((2, 8), jnp.int32)}
    plain = str(jax.make_jaxpr(lambda p, b: loss_fn(p, b, cfg.model))(params, batch))
    assert "sharding_constraint" not in plain
    layout = make_layout(_tiny(*LAYOUTS["data=2,fsdp=2,tensor=2"]))
    with sharding.activate(layout):
        constrained = str(jax.make_jaxpr(lambda p, b: loss_fn(p, b, cfg.model))(params, batch))
    assert "sharding_constraint" in constrained


# --- sharded training ≡ one device --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_cli_training_on_a_mesh_matches_one_device(layout_name, single_losses, tmp_path):
    assert cli_main(_train_args(tmp_path, *LAYOUTS[layout_name])) == 0
    np.testing.assert_allclose(_losses(tmp_path), single_losses, **SHARDED_VS_SINGLE_LOSS)
    assert json.loads((tmp_path / "config.json").read_text())["mesh"]["tensor"] == (
        2 if "tensor" in layout_name else 1)


@pytest.mark.slow
def test_a_run_resumes_on_another_mesh(single_run, single_losses, tmp_path):
    """The one-device run's step-6 checkpoint, resumed on fsdp=8: restored onto the new shardings,
    the remaining steps give the one-device losses; config.json records the new mesh."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    shutil.rmtree(run / "checkpoints" / "12")
    (run / "summary.json").unlink()
    assert cli_main(_train_args(run, "mesh.fsdp=8")) == 0
    np.testing.assert_allclose(_losses(run), single_losses, **SHARDED_VS_SINGLE_LOSS)
    assert json.loads((run / "config.json").read_text())["mesh"]["fsdp"] == 8
    with pytest.raises(ConfigError, match="holds a run with a different config"):
        jscale.train.train(_tiny("mesh.fsdp=8", "optim.lr=1e-2"), run, quiet=True)


def _two_processes(out: Path, port: int) -> None:
    """`jscale train` as two processes × 4 CPU devices, mesh data=2, fsdp=4, on localhost."""
    args = _train_args(out, "mesh.data=2", "mesh.fsdp=4")
    procs = [subprocess.Popen([sys.executable, "-m", "jscale.cli", *args, "--coordinator",
                               f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env(XLA_FLAGS=xla_flags(4),
                                      JAX_PLATFORMS="cpu"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for i, proc in enumerate(procs):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"process {i} failed:\n{err[-3000:]}"


@pytest.mark.slow
def test_two_process_run_matches_single_process_and_resumes_exactly(single_losses, tmp_path,
                                                                   free_port):
    _two_processes(tmp_path, free_port)
    losses = _losses(tmp_path)
    np.testing.assert_allclose(losses, single_losses, **SHARDED_VS_SINGLE_LOSS)
    # Both processes saved their data-iterator state; orbax wrote one sharded state.
    assert sorted(os.listdir(tmp_path / "checkpoints" / "6" / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    # Resume from step 6: drop the final checkpoint and summary, rerun the same command.
    import shutil
    shutil.rmtree(tmp_path / "checkpoints" / "12")
    (tmp_path / "summary.json").unlink()
    _two_processes(tmp_path, free_port)
    assert _losses(tmp_path) == losses  # bitwise: the resumed run continues exactly


# --- bad meshes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["mesh.data=3"], r"mesh: the axis sizes \(data=3\) multiply to 3, but there are 8 devices; "
                      r"their product must equal the device count"),
    (["mesh.data=3", "mesh.fsdp=-1"], r"mesh.fsdp: -1 fills the remaining devices, but the other "
                                      r"axes \(data=3\) multiply to 3, which does not divide the 8"),
    (["mesh.data=8", "train.batch_size=12"],
     r"train.batch_size: must be divisible by mesh.data × mesh.fsdp = 8 × 1 = 8 \(got 12\)"),
    (["mesh.tensor=4", "mesh.data=2"], r"mesh.tensor: must divide model.n_kv_heads = 2"),
    (["mesh.tensor=8", "model.n_heads=8", "model.n_kv_heads=8", "model.d_ff=100"],
     r"mesh.tensor: must divide the FFN / inner width \(model.d_ff.*\) = 100"),
    (["mesh.fsdp=8", "model.d_model=132", "model.n_heads=2", "model.n_kv_heads=2"],
     r"mesh.fsdp: must divide model.d_model = 132"),
    (["mesh.expert=8"], r"mesh.expert: the model has no experts"),
    (["mesh.runs=8"], r"mesh.runs: only `jscale sweep` shards runs"),
])
def test_bad_meshes_fail_at_start_up(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_layout(_tiny(*overrides))


def test_bad_mesh_cli_exits_2_with_one_line(tmp_path, capsys):
    assert cli_main(_train_args(tmp_path, "mesh.data=3")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jscale train: error: mesh: the axis sizes") and "\n" not in err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_two_minus_ones_and_partial_distributed_flags_are_rejected():
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        _tiny("mesh.data=-1", "mesh.fsdp=-1")
    with pytest.raises(ConfigError, match="--coordinator, --num-processes and --process-id go "
                                          "together"):
        mesh.initialize_distributed("localhost:1234", None, None)
    with pytest.raises(ConfigError, match=r"--process-id: must be in \[0, --num-processes=2\)"):
        mesh.initialize_distributed("localhost:1234", 2, 5)


def test_minus_one_fills_the_remaining_devices():
    m = mesh.make_mesh(_tiny("mesh.data=2", "mesh.fsdp=-1"))
    assert dict(m.shape) == {"runs": 1, "data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),  # a one-task SLURM job: one process
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "1"}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # a single-host TPU VM
    ({"TPU_WORKER_HOSTNAMES": "host0,host1"}, True),  # a pod slice
    ({"JAX_COORDINATOR_ADDRESS": "host0:1234"}, True),
])
def test_cluster_auto_detection_only_in_multi_process_jobs(env, expected, monkeypatch):
    for var in mesh._CLUSTER_ENV + ("SLURM_NTASKS",):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert mesh._in_cluster() is expected
    if not expected:  # no flags, no cluster: a single-process run, nothing is initialized
        assert mesh.initialize_distributed() is False


@pytest.mark.parametrize("preset, overrides, module, name", [
    ("tiny", {"model.attention_impl": "pallas", "model.d_model": 64, "model.d_ff": 128,
              "model.n_layers": 1}, "pallas_kernels.flash_attention", "flash_attention"),
    ("mamba-tiny", {"model.scan_impl": "pallas", "model.d_model": 32, "model.n_layers": 1},
     "pallas_kernels.selective_scan", "selective_scan"),
])
def test_pallas_kernels_run_per_shard_on_a_mesh(preset, overrides, module, name, monkeypatch):
    """On a mesh the (opaque) Pallas kernels run under shard_map on each device's batch rows and
    heads / channels, and the sharded loss and gradients equal the unsharded XLA path's."""
    import importlib
    cfg = jscale.presets.get(preset).override(
        {**overrides, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.batch_size": 4,
         "train.seq_len": 32})
    xla_cfg = cfg.override({k: "xla" for k in overrides if k.endswith("_impl")})
    layout = make_layout(cfg)
    params = jscale.models.init(jax.random.PRNGKey(0), cfg.model)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 33), 0, 257)
    segments = jnp.concatenate([jnp.zeros((4, 10), jnp.int32), jnp.ones((4, 22), jnp.int32)], 1)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments}
    shapes = []
    mod = importlib.import_module(module)
    kernel = getattr(mod, name)
    def recording(*args, **kwargs):  # the shapes the Pallas kernel is called with
        if kwargs.get("impl") == "pallas":
            shapes.append(args[0].shape)
        return kernel(*args, **kwargs)
    monkeypatch.setattr(mod, name, recording)
    if preset == "mamba-tiny":  # the model imported the function by name
        monkeypatch.setattr(jscale.models.mamba, name, getattr(mod, name))

    def value_and_grad(model_cfg):
        return jax.value_and_grad(lambda p, b: loss_fn(p, b, model_cfg)[0])
    ref_loss, ref_grads = jax.jit(value_and_grad(xla_cfg.model))(params, batch)
    sharded = jax.jit(sharding.traced_under(layout, value_and_grad(cfg.model)),
                      in_shardings=(sharding.tree_shardings(params, layout.mesh),
                                    layout.batch_sharding()))
    loss, grads = sharded(params, batch)
    # Batch 4 over data × fsdp = 4 devices, heads (4) / channels (64) over tensor = 2.
    assert shapes and set(shapes) == {(1, 32, 2, 16) if preset == "tiny" else (1, 32, 32)}
    np.testing.assert_allclose(loss, ref_loss, **SHARDED_VS_SINGLE_LOSS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_GRAD), grads, ref_grads)


@pytest.mark.parametrize("platform, variant", [("cuda", "gpu"), ("tpu", "tpu")])
@pytest.mark.parametrize("family", ["transformer", "mamba"])
def test_sharded_train_step_with_kernels_lowers_for_hardware(family, platform, variant,
                                                              monkeypatch):
    """The whole sharded train step (mesh data=2, fsdp=2, tensor=2) with compiled Pallas kernels
    lowers for CUDA and TPU, each kernel inside a manual (shard_map) region on its local block."""
    import functools
    import importlib
    if family == "transformer":
        mod = importlib.import_module("pallas_kernels.flash_attention")
        monkeypatch.setattr(mod, "flash_attention", functools.partial(
            mod.flash_attention, interpret=False, platform=variant))
        cfg = _tiny("model.attention_impl=pallas")
        # B 16 / (data·fsdp), T 128, H 4 / tensor, K 32 (the TPU kernel takes heads before T)
        local = "4x128x2x32" if platform == "cuda" else "4x2x128x32"
        markers = {"cuda": "custom_call @__gpu$xla.gpu.triton", "tpu": "custom_call @tpu_custom_call"}
    else:
        from jscale.models import mamba
        monkeypatch.setattr(mamba, "selective_scan", functools.partial(
            mamba.selective_scan, interpret=False, target=variant))
        # bfloat16: with packed documents (resets) the float32 GPU backward does not fit shared
        # memory (pallas_kernels.selective_scan.kernel.plan_for says so).
        cfg = jscale.presets.get("mamba-tiny").override({"model.scan_impl": "pallas",
                                                         "model.dtype": "bfloat16"})
        local = "4x128x128"  # B 16 / (data·fsdp), T 128, F 256 / tensor
        markers = {"cuda": "custom_call @mosaic_gpu", "tpu": "custom_call @tpu_custom_call"}
    cfg = cfg.override({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
    layout = make_layout(cfg)
    optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
    state = jax.eval_shape(lambda: jscale.core.init_state(cfg, optimizer))
    batch = {k: jax.ShapeDtypeStruct((16, 128), jnp.int32)
             for k in ("inputs", "targets", "segment_ids")}
    step = jscale.train.make_train_step(cfg, optimizer, layout)
    text = step.trace(state, batch).lower(lowering_platforms=(platform,)).as_text()
    kernel_lines = [line for line in text.splitlines() if markers[platform] in line]
    assert len(kernel_lines) >= 2  # forward and backward kernels (in the layer scan's body)
    assert all(local in line for line in kernel_lines), kernel_lines[0][-300:]
    assert "manual_computation" in text
