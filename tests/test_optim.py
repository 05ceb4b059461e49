"""The weight-decay mask: the LM head's decay is explicit (``optim.decay_head``) whether tied or not."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jscale
from jscale import optim

TRANSFORMER = jscale.presets.get("tiny").model
MAMBA = jscale.MambaConfig(d_model=16, n_layers=1, d_state=4)


@pytest.mark.parametrize("model", [TRANSFORMER, MAMBA], ids=["transformer", "mamba"])
def test_untied_head_decays_only_with_decay_head(model):
    params = jscale.init(jax.random.PRNGKey(0), dataclasses.replace(model, tie_embeddings=False))
    assert "w_DV" in params["head"]
    default = optim.decay_mask(params, decay_embeddings=False)
    assert not default["head"]["w_DV"] and not default["embed"]["table_VD"]
    assert optim.decay_mask(params, decay_embeddings=False, decay_head=True)["head"]["w_DV"]
    # The head flag is the head's alone: the embedding still follows decay_embeddings.
    assert not optim.decay_mask(params, decay_embeddings=False, decay_head=True)["embed"]["table_VD"]
    assert not optim.decay_mask(params, decay_embeddings=True)["head"]["w_DV"]
    # Block matrices decay either way; norm scales never.
    for path, decays in jax.tree_util.tree_leaves_with_path(default["layers"]):
        assert decays == str(path[-1].key).startswith("w_"), path


def test_tied_head_follows_decay_embeddings():
    params = jscale.init(jax.random.PRNGKey(0), TRANSFORMER)  # the tiny preset ties its head
    assert TRANSFORMER.tie_embeddings and "head" not in params
    for decay_head in (False, True):
        mask = optim.decay_mask(params, decay_embeddings=False, decay_head=decay_head)
        assert not mask["embed"]["table_VD"]
        mask = optim.decay_mask(params, decay_embeddings=True, decay_head=decay_head)
        assert mask["embed"]["table_VD"]


@pytest.mark.parametrize("decay_head", [False, True])
def test_optimizer_decays_the_untied_head_as_configured(decay_head):
    """With zero gradients AdamW's update is pure decay: the head moves iff ``decay_head``."""
    model = dataclasses.replace(TRANSFORMER, tie_embeddings=False)
    params = jscale.init(jax.random.PRNGKey(0), model)
    cfg = jscale.OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant",
                             decay_head=decay_head)
    opt = optim.make_optimizer(cfg, total_steps=10)
    updates, _ = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    assert np.any(updates["head"]["w_DV"] != 0) == decay_head
    assert np.any(updates["layers"]["attn"]["w_q_LDHK"] != 0)
    assert np.all(updates["embed"]["table_VD"] == 0)
