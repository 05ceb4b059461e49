"""What the shared LM scaffold (:mod:`jscale.models.lm`) is told about a model: its stacks of
blocks of residual sub-layers, each built from a part (:mod:`jscale.models.parts`), and the
scaffold's own shape and numerics. A family builds an :class:`LMSpec` from its config."""

from __future__ import annotations

import dataclasses

from jscale.models.parts.base import Part

DTYPES = ("float32", "bfloat16", "float16")

#: Rematerialization policies of the layer body: "none" saves every activation; "full" recomputes
#: the whole block in the backward pass; "dots" saves matmul outputs; "dots_no_batch" saves matmul
#: outputs without batch dims (weights-stationary); "save_attention" saves only the attention
#: context (named checkpoint "attn_context") and recomputes the rest.
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention")


@dataclasses.dataclass(frozen=True)
class Sublayer:
    """One residual sub-layer ``x + part(rms_norm(x))``: the part's params live at
    ``layers[name]``, its norm's scale at ``layers[norm]["scale_LD"]``."""

    name: str
    norm: str
    part: Part


@dataclasses.dataclass(frozen=True)
class Stack:
    """``n_steps`` copies of ``block`` run in order (one scan), parameters at ``params[key]``
    stacked on a leading ``L = n_steps``."""

    key: str
    n_steps: int
    block: tuple[Sublayer, ...]


#: The model-state key of a packed member's true sizes (:mod:`jscale.models.packing`).
PACK_KEY = "pack"
#: Top-level parameter (and model-state) keys a stack may not take.
RESERVED_KEYS = ("embed", "final_norm", "head", PACK_KEY)


@dataclasses.dataclass(frozen=True)
class LMSpec:
    """Everything the scaffold needs to know about a model (a family builds it from its config).

    ``n_layers`` is the model's depth (layers, not sub-layers). With ``stacks`` empty the model is
    one stack, ``Stack("layers", n_layers, block)``; otherwise ``stacks`` lists the model's stacks in
    order (``block`` is then unused: pass ``()``).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    norm_eps: float
    tie_embeddings: bool
    init_scale: float
    dtype: str
    param_dtype: str
    remat: str
    scan_layers: bool
    block: tuple[Sublayer, ...]
    stacks: tuple[Stack, ...] = ()

    def __post_init__(self):
        keys = [st.key for st in self.layer_stacks]
        if len(set(keys)) != len(keys) or set(keys) & set(RESERVED_KEYS):
            raise ValueError(f"stack keys must be unique and not one of {RESERVED_KEYS}: {keys}")
        for st in self.layer_stacks:
            if st.n_steps < 1:
                raise ValueError(f"stack {st.key!r} has {st.n_steps} steps")

    @property
    def layer_stacks(self) -> tuple[Stack, ...]:
        """The model's stacks, in order (one ``"layers"`` stack unless ``stacks`` is given)."""
        return self.stacks or (Stack("layers", self.n_layers, self.block),)
