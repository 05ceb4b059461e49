"""XLA's own FLOP count of a model's forward pass, the independent check of analytic FLOP counts."""

import jax
import jax.numpy as jnp

import jscale


def forward_flops(cfg, batch: int, seq: int) -> float:
    """FLOPs XLA's cost analysis counts for ``jscale.apply`` on ``[batch, seq]`` tokens (compiled
    from abstract parameters; a while-loop body is counted once, so unroll layers and scans)."""
    abstract = jax.eval_shape(lambda: jscale.init(jax.random.PRNGKey(0), cfg))
    compiled = jax.jit(lambda p, t: jscale.apply(p, t, cfg)[0]).lower(
        abstract, jax.ShapeDtypeStruct((batch, seq), jnp.int32)).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]
