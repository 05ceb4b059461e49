"""Published scaling-law measurements shipped with jscale (``jscale/data_published/``, provenance in
its README): read them to reproduce the published fits or to test a fitter."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd

#: Epoch AI drop the 5 highest losses of the 245 extracted points before fitting.
EPOCH_DROPPED = 5
PARSCALE_DATASETS = ("stack_v2_python", "pile")


def _read(name: str) -> pd.DataFrame:
    with resources.files("jscale").joinpath("data_published", name).open() as f:
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
