"""Expert parallelism on 8 fake CPU devices (issue 13): the dropless dispatch under a mesh with
``expert`` > 1 — tokens to their experts' devices and back with fixed-capacity all-to-alls under
``jax.shard_map`` (:func:`jscale.models.parts.moe.expert_parallel`) — gives the one-device loss,
gradients and router state, alone and combined with data, fsdp and tensor (and vmapped over sweep
members, on the ``runs`` axis or not); training on such meshes (in one process and across two)
gives the one-device losses; ``check_mesh`` rejects meshes the experts do not fit."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import env, micro_cfg, train_args, xla_flags
from tolerances import F32_GRAD, SHARDED_VS_SINGLE_LOSS

import jscale
import jscale.train
from jscale import sharding
from jscale.config import ConfigError
from jscale.core import loss_and_state, make_layout

#: A moe-tiny-like micro: 8 experts of width 32, top-2, a shared expert, every router loss and the
#: bias update on; batch 8 × 32 tokens, 10 steps, every step logged.
MICRO = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_ff=64", "model.moe.n_experts=8", "model.moe.top_k=2", "model.moe.d_expert=32",
         "model.moe.n_shared_experts=1", "model.moe.bias_update_rate=0.01",
         "train.batch_size=8", "train.seq_len=32", "train.steps=10", "train.log_every=1",
         "train.eval_every=0", "train.eval_batches=1", "train.checkpoint_every=0"]
MESHES = {"expert=4,data=2": ["mesh.expert=4", "mesh.data=2"],
          "expert=2,fsdp=4": ["mesh.expert=2", "mesh.fsdp=4"],
          "expert=2,data=2,tensor=2": ["mesh.expert=2", "mesh.data=2", "mesh.tensor=2"],
          "expert=8": ["mesh.expert=8"], "expert=4,runs=2": ["mesh.expert=4", "mesh.runs=2"]}


def _cfg(*overrides: str):
    return micro_cfg(MICRO + list(overrides), preset="moe-tiny")


def _batch(cfg, seed=1):
    B, T = cfg.train.batch_size, cfg.train.seq_len
    tokens = jax.random.randint(jax.random.PRNGKey(seed), (B, T + 1), 0, cfg.model.vocab_size)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@pytest.mark.parametrize("mesh_name, extra", [
    ("expert=4,data=2", []),
    ("expert=2,data=2,tensor=2", []),
    pytest.param("expert=2,fsdp=4", [], marks=pytest.mark.slow),
    pytest.param("expert=8", ["train.batch_size=2", "train.seq_len=13"],  # 26 tokens: padded
                 marks=pytest.mark.slow),
    pytest.param("expert=4,data=2", ["model.moe.capacity_factor=1.25"], marks=pytest.mark.slow),
])
def test_expert_parallel_loss_grads_and_state_equal_one_device(mesh_name, extra):
    """One loss-and-gradient evaluation (one layer, 8 × 16 tokens): loss, metrics, new router
    bias and every gradient as on one device."""
    cfg = _cfg(*MESHES[mesh_name], "model.n_layers=1", "train.seq_len=16", *extra)
    if "train.batch_size=2" in extra:
        assert cfg.train.batch_size * cfg.train.seq_len % 8  # the shares need padding
    layout = make_layout(cfg)
    params = jscale.models.init(jax.random.PRNGKey(0), cfg.model)
    state = jscale.models.init_model_state(cfg.model)
    batch = _batch(cfg)

    def loss(p, b):  # (loss, (metrics, new model state))
        return loss_and_state(p, b, cfg.model, state)

    ref = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch)
    shardings = sharding.tree_shardings(params, layout.mesh)
    got = jax.jit(sharding.traced_under(layout, jax.value_and_grad(loss, has_aux=True)),
                  in_shardings=(shardings, layout.batch_sharding()))(params, batch)
    (ref_loss, ref_extra), ref_grads = ref
    (got_loss, got_extra), got_grads = got
    np.testing.assert_allclose(got_loss, ref_loss, **SHARDED_VS_SINGLE_LOSS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_GRAD), got_grads, ref_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_GRAD), got_extra, ref_extra)


def test_the_dispatch_is_an_all_to_all_only_under_an_expert_mesh():
    """With expert > 1 the routed experts run in a manual (shard_map) region with all-to-alls; with
    no layout (or expert = 1) the program is the one-device one: no collective, no constraint."""
    cfg = _cfg()
    params = jax.eval_shape(lambda: jscale.models.init(jax.random.PRNGKey(0), cfg.model))
    batch = jax.eval_shape(lambda: _batch(cfg))

    def jaxpr(layout):
        with sharding.activate(layout):
            return str(jax.make_jaxpr(lambda p, b: loss_and_state(p, b, cfg.model))(params, batch))
    plain = jaxpr(None)
    assert "all_to_all" not in plain and "shard_map" not in plain
    assert "sharding_constraint" not in plain
    assert "all_to_all" not in jaxpr(make_layout(_cfg("mesh.data=8")))
    parallel = jaxpr(make_layout(_cfg(*MESHES["expert=4,data=2"])))
    assert "shard_map" in parallel and parallel.count("all_to_all") >= 3 * cfg.model.n_layers // 2


@pytest.mark.parametrize("overrides, message", [
    (["mesh.expert=8", "model.moe.n_experts=4", "model.moe.top_k=2"],
     r"mesh.expert: must divide model.moe.n_experts = 4 \(dim E of parameter"),
    (["mesh.expert=4", "mesh.data=2", "model.moe.n_experts=6"],
     r"mesh.expert: must divide model.moe.n_experts = 6"),
])
def test_check_mesh_rejects_experts_the_expert_axis_does_not_divide(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_layout(_cfg(*overrides))


def test_check_mesh_rejects_an_expert_axis_on_a_dense_model():
    with pytest.raises(ConfigError, match=r"mesh.expert: the model has no experts .* must be 1 "
                                          r"\(got 4\)"):
        make_layout(micro_cfg(["mesh.expert=4", "mesh.data=2"]))


# --- training ≡ one device ----------------------------------------------------------------------------


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 11))
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def single_losses(tmp_path_factory) -> list[float]:
    """The micro MoE trained 10 steps on one device: its per-step losses."""
    out = tmp_path_factory.mktemp("moe-single")
    jscale.train.train(_cfg(), out, quiet=True)
    return _losses(out)


@pytest.mark.slow
def test_training_on_an_expert_mesh_matches_one_device(single_losses, tmp_path):
    """In one process, mesh expert=2, fsdp=4 (the experts' and the optimizer state's shards both
    split): the one-device losses. Loss, gradients and router state on expert=4, data=2 and the other
    meshes are checked above, one evaluation each; mesh expert=8 trains across two processes below."""
    jscale.train.train(_cfg(*MESHES["expert=2,fsdp=4"]), tmp_path, quiet=True)
    np.testing.assert_allclose(_losses(tmp_path), single_losses, **SHARDED_VS_SINGLE_LOSS)


@pytest.mark.slow
def test_two_process_run_on_the_expert_axis_matches_one_device(single_losses, tmp_path,
                                                                free_port):
    """Two processes × 4 CPU devices, mesh expert=8: every all-to-all crosses the processes."""
    args = train_args(tmp_path, MICRO, "mesh.expert=8", preset="moe-tiny")
    procs = [subprocess.Popen([sys.executable, "-m", "jscale.cli", *args, "--coordinator",
                               f"localhost:{free_port}", "--num-processes", "2", "--process-id",
                               str(i)],
                              env=env(XLA_FLAGS=xla_flags(4),
                                      JAX_PLATFORMS="cpu"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for i, proc in enumerate(procs):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"process {i} failed:\n{err[-3000:]}"
    np.testing.assert_allclose(_losses(tmp_path), single_losses, **SHARDED_VS_SINGLE_LOSS)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", ["expert=4,data=2", "expert=4,runs=2"])
def test_vmapped_members_on_an_expert_mesh_equal_one_device(mesh_name):
    """A sweep group's vmap over members (R = 2) of the expert-parallel loss and gradients, with the
    members on the ``runs`` axis or not: as on one device."""
    cfg = _cfg(*MESHES[mesh_name], "model.n_layers=1", "train.seq_len=16")
    layout = make_layout(cfg, sweep=True)
    params = jax.vmap(lambda k: jscale.models.init(k, cfg.model))(
        jax.random.split(jax.random.PRNGKey(0), 2))
    state, batch = jscale.models.init_model_state(cfg.model), _batch(cfg)
    fn = jax.vmap(jax.value_and_grad(lambda p: loss_and_state(p, batch, cfg.model, state)[0]))
    ref = jax.jit(fn)(params)
    got = jax.jit(sharding.traced_under(layout, fn), in_shardings=(
        sharding.tree_shardings(params, layout.mesh, runs_axis=True),))(params)
    np.testing.assert_allclose(got[0], ref[0], **SHARDED_VS_SINGLE_LOSS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **F32_GRAD), got[1], ref[1])


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_expert_parallel_train_step_lowers_for_hardware(platform):
    """The whole train step on mesh expert=4, data=2 lowers for CUDA and TPU, the dispatch a
    manual (shard_map) region with its all-to-alls."""
    from jscale import optim
    cfg = _cfg(*MESHES["expert=4,data=2"])
    layout = make_layout(cfg)
    optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
    state = jax.eval_shape(lambda: jscale.core.init_state(cfg, optimizer))
    batch = {k: jax.ShapeDtypeStruct((8, 32), jax.numpy.int32)
             for k in ("inputs", "targets", "segment_ids")}
    step = jscale.train.make_train_step(cfg, optimizer, layout)
    text = step.trace(state, batch).lower(lowering_platforms=(platform,)).as_text()
    assert "manual_computation" in text and text.count("all_to_all") >= 3
