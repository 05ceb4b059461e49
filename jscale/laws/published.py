"""Published scaling-law measurements shipped with jscale (``jscale/data_published/``, provenance in
its README): read them to reproduce the published fits or to test a fitter — Chinchilla's points
(:func:`epoch_chinchilla`), ParScale's losses (:func:`parscale`), Clark et al. (2022)'s routed-LM
curves (:func:`clark_routing_curves`, and the points of their law's fit: :func:`clark_routing`)."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd

#: Epoch AI drop the 5 highest losses of the 245 extracted points before fitting.
EPOCH_DROPPED = 5
PARSCALE_DATASETS = ("stack_v2_python", "pile")


#: The routing methods Clark et al. (2022) compare (the source's ``router_type`` spellings).
CLARK_ROUTERS = ("S-Base", "RL-R", "Hash")


def _read(name: str) -> pd.DataFrame:
    path = resources.files("jscale").joinpath("data_published", name)
    if name.endswith(".gz"):
        with path.open("rb") as f:
            return pd.read_csv(f, compression="gzip")
    with path.open() as f:
        return pd.read_csv(f)


def epoch_chinchilla(drop_highest: int = EPOCH_DROPPED) -> pd.DataFrame:
    """Chinchilla's Fig. 4 points as extracted by Epoch AI (Besiroglu et al. 2024): columns ``N``
    (parameters), ``C`` (training FLOPs), ``D = C / (6N)`` (tokens) and ``loss``, without the
    ``drop_highest`` highest losses (Epoch's protocol: 5, leaving 240 points)."""
    df = _read("chinchilla_svg_extracted_data.csv")
    out = pd.DataFrame({"N": df["Model Size"], "C": df["Training FLOP"], "loss": df["loss"]})
    out["D"] = out["C"] / (6.0 * out["N"])
    if drop_highest:
        # Epoch's rule: keep the points strictly below the drop_highest-th highest loss
        cutoff = np.sort(out["loss"].to_numpy())[-drop_highest]
        out = out[out["loss"] < cutoff]
    return out.reset_index(drop=True)[["N", "D", "C", "loss"]]


def parscale(dataset: str) -> pd.DataFrame:
    """ParScale's pre-training losses (Chen et al. 2025) for ``dataset`` (``"stack_v2_python"`` or
    ``"pile"``): columns ``N`` (non-embedding parameters incl. prefix and aggregator), ``P``
    (streams), ``loss`` — 24 rows."""
    if dataset not in PARSCALE_DATASETS:
        raise ValueError(f"dataset: expected one of {PARSCALE_DATASETS} (got {dataset!r})")
    df = _read("parscale_pretrain_losses.csv")
    df = df[df["dataset"] == dataset]
    return pd.DataFrame({"N": df["N_nonembedding_params"].astype(float),
                         "P": df["P"].astype(float),
                         "loss": df["final_train_loss"].astype(float)}).reset_index(drop=True)


def clark_routing_curves() -> pd.DataFrame:
    """Clark et al. (2022)'s training curves of dense and routed LMs, as released
    (google-deepmind/scaling_laws_for_routing ``data/curves.csv.gz``, CC-BY 4.0): 5,799 rows, one per
    (``hyper_id``, ``step``) evaluation every 10,000 steps, with the source's columns —
    ``router_type`` (``Dense``, ``S-Base``, ``RL-R``, ``Hash``), ``num_experts`` (E),
    ``k`` (experts per token), ``routing_frequency`` (fraction of blocks routed),
    ``flop_increase`` (dense models with a widened FFN), ``d_model``, ``num_blocks``,
    ``num_heads``, ``kqv_size``, ``seed``, ``dense_parameter_count`` (N: parameters one token
    uses), ``total_parameter_count`` (every expert), ``flops_per_step``, ``model_size_label``, and
    the losses ``loss_validation`` (held-out training distribution), ``loss_c4``,
    ``loss_curation_corpus``, ``loss_lambada``, ``loss_pile``, ``loss_wikitext103`` (nats per
    token; a few are NaN)."""
    return _read("routed_lm_clark2022_curves.csv.gz")


def clark_routing(router: str, *, loss: str = "loss_validation") -> pd.DataFrame:
    """The points Clark et al. (2022) fit their routed-LM law on, for one routing method ``router``
    (``"S-Base"``, ``"RL-R"`` or ``"Hash"``): each run's final evaluation (step 248k–250k), top-1
    routing (``k == 1``) on every other block (``routing_frequency == 0.5``), seed 42, plus the dense
    runs as E = 1 (the selection of the authors' released notebook). Columns ``N``
    (``dense_parameter_count``), ``E`` (``num_experts``), ``P`` (``total_parameter_count``),
    ``loss`` (the column named by ``loss``), ``router`` (``Dense`` for the E = 1 rows), ``step``,
    ``hyper_id`` — 58 rows for S-Base, 59 for RL-R, 56 for Hash."""
    if router not in CLARK_ROUTERS:
        raise ValueError(f"router: expected one of {CLARK_ROUTERS} (got {router!r})")
    df = clark_routing_curves()
    if loss not in df.columns or not loss.startswith("loss_"):
        raise ValueError(f"loss: expected one of the loss_* columns "
                         f"{[c for c in df.columns if c.startswith('loss_')]} (got {loss!r})")
    last = df.sort_values(["hyper_id", "step"]).groupby("hyper_id").tail(1)
    sel = last[(last["routing_frequency"] == 0.5) & (last["k"] == 1) & (last["seed"] == 42)
               & last["router_type"].isin(["Dense", router]) & last[loss].notna()]
    out = pd.DataFrame({"N": sel["dense_parameter_count"].astype(float),
                        "E": sel["num_experts"].astype(float),
                        "P": sel["total_parameter_count"].astype(float),
                        "loss": sel[loss].astype(float),
                        "router": sel["router_type"], "step": sel["step"],
                        "hyper_id": sel["hyper_id"]})
    return out.sort_values(["E", "N"], kind="stable").reset_index(drop=True)
