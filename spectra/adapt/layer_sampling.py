"""Layer sampling probabilities: OwLore (outlier-weighted) and LISA (uniform).

LISA (Pan et al. 2024, "LISA: Layerwise Importance Sampling for Memory-Efficient Large Language
Model Fine-Tuning", arXiv 2403.17919): every ``K`` steps, ``gamma`` of the ``N_L`` middle
(decoder) layers are unfrozen, drawn uniformly; the embedding and the head always train. Each
middle layer has weight ``1 / N_L``.

OwLore (Li et al. 2024, "OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection for
Memory-Efficient LLM Fine-tuning", arXiv 2405.18380): the weight of layer ``l`` is its share of
the outliers, ``p_l = D_l / sum_j D_l``, where ``D_l`` is the layer's outlier ratio (OWL's
layerwise outlier distribution, spectra.analysis.outliers, M = 13); its released trainer draws
``gamma`` distinct layers with these weights (``numpy.random.choice(N_L, gamma,
replace=False, p=p)``) every interval. ``D_l`` here pools the layer's matrices (outlier entries
over entries, each matrix thresholded at its own mean); docs/methods.md says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from spectra.analysis.results import json_safe
from spectra.errors import ValidationError


@dataclass(frozen=True)
class MatrixRatio:
    """One matrix's outlier ratio and size, in its layer."""

    key: str
    layer: int
    numel: int
    ratio: float


@dataclass(frozen=True)
class LayerSampling:
    """Per layer (ascending index): the score it was weighted by and its probability."""

    layers: tuple[int, ...]
    scores: tuple[float, ...]
    probabilities: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "layers": list(self.layers),
                "scores": list(self.scores),
                "probabilities": list(self.probabilities),
            }
        )


def layer_outlier_ratios(matrices: Sequence[MatrixRatio]) -> dict[int, float]:
    """``D_l = sum(ratio * numel) / sum(numel)`` over the matrices of each layer: the share of
    outlier entries in the layer."""
    counts: dict[int, float] = {}
    sizes: dict[int, int] = {}
    for m in matrices:
        if not np.isfinite(m.ratio) or m.ratio < 0:
            raise ValidationError(f"outlier ratio of {m.key!r} is {m.ratio!r}: not a share")
        counts[m.layer] = counts.get(m.layer, 0.0) + m.ratio * m.numel
        sizes[m.layer] = sizes.get(m.layer, 0) + m.numel
    return {layer: counts[layer] / sizes[layer] for layer in sorted(counts)}


def check_layers(layers: Sequence[int]) -> None:
    """The trainers index layers 0..N-1: every index must be there exactly once."""
    if list(layers) != list(range(len(layers))):
        missing = sorted(set(range(max(layers, default=-1) + 1)) - set(layers))
        raise ValidationError(
            f"layers must be 0..N-1 without gaps for a sampling plan; missing {missing[:5]}: "
            "select every layer of the model"
        )


def owlore_sampling(ratios: Mapping[int, float]) -> LayerSampling:
    """OwLore's ``p_l = D_l / sum D`` (see the module docstring)."""
    layers = sorted(ratios)
    check_layers(layers)
    scores = np.array([ratios[layer] for layer in layers], dtype=np.float64)
    total = float(scores.sum())
    if not total > 0:
        raise ValidationError(
            "no layer has any outlier at this multiplier (sum of ratios is 0): lower "
            "--outlier-multiplier"
        )
    return LayerSampling(tuple(layers), tuple(scores.tolist()), tuple((scores / total).tolist()))


def lisa_sampling(layers: Sequence[int]) -> LayerSampling:
    """LISA's uniform ``p_l = 1 / N_L``."""
    ordered = sorted(set(layers))
    check_layers(ordered)
    if not ordered:
        raise ValidationError("no numbered layers to sample")
    p = 1.0 / len(ordered)
    return LayerSampling(tuple(ordered), tuple([1.0] * len(ordered)), tuple([p] * len(ordered)))


def check_gamma(gamma: int, n_layers: int) -> None:
    """gamma layers drawn without replacement: 1 <= gamma <= N_L."""
    if not 1 <= gamma <= n_layers:
        raise ValidationError(
            f"--activated-layers {gamma} must be between 1 and the {n_layers} layers"
        )
