"""A hand-made Analysis for report tests: real eigenvalues of small random matrices, metrics
computed from them in float64 (the fit fields are set by hand to cover every warning state), and
tensor names that try to inject markup."""

from __future__ import annotations

import math

import numpy as np

from spectra.analysis.results import Analysis, GroupSummary, LayerMetrics, ModelSummary

EVIL = "<script>alert(1)</script>"
ROLES = ("q", "k", "v", "o", "up", "down")


def _layer(
    key: str,
    role: str,
    layer: int | None,
    lam: np.ndarray,
    alpha: float | None,
    status: str,
    outlier: float | None,
) -> LayerMetrics:
    lam = np.sort(lam)[::-1]
    ok = status == "ok" and alpha is not None
    warnings: list[str] = []
    if ok and alpha < 2:  # type: ignore[operator]
        warnings.append("over-trained")
    if ok and alpha > 6:  # type: ignore[operator]
        warnings.append("under-trained")
    if status == "failed":
        warnings.append("fit-failed")
    xmin = float(lam[len(lam) // 2]) if ok else None
    return LayerMetrics(
        key=key,
        name=key,
        role=role,
        layer=layer,
        shape=(48, 32),
        dtype="F32",
        num_evals=int(lam.size),
        alpha=alpha if ok else None,
        alpha_weighted=alpha * math.log10(lam[0]) if ok else None,  # type: ignore[operator]
        xmin=xmin,
        xmax=float(lam[0]) if ok else None,
        D=0.05 if ok else None,
        sigma=(alpha - 1) / math.sqrt(lam.size // 2) if ok else None,  # type: ignore[operator]
        num_pl_spikes=lam.size // 2 if ok else 0,
        fit_status=status,
        fit_message="" if ok else "no xmin candidate with a finite alpha",
        log_norm=math.log10(lam.sum()),
        log_spectral_norm=math.log10(lam[0]),
        stable_rank=float(lam.sum() / lam[0]),
        log_alpha_norm=math.log10(np.sum(lam**alpha)) if ok else None,  # type: ignore[operator]
        entropy=0.9,
        numerical_rank=int(lam.size),
        outlier_ratio=outlier,
        warnings=tuple(warnings),
        spectrum_method="svdvals",
    )


def make_analysis(num_layers: int = 3, *, evil: bool = True, seed: int = 0) -> Analysis:
    """An Analysis of `num_layers` blocks x ROLES plus an embedding (no layer index).

    Layer 0 'q' is over-trained (alpha 1.5), the last 'down' under-trained (alpha 7.5), layer 1
    'v' has a failed fit; with `evil`, the embedding's key is a script tag."""
    rng = np.random.default_rng(seed)
    layers = []
    esds = {}
    for depth in range(num_layers):
        for j, role in enumerate(ROLES):
            key = f"encoder.layer.{depth}.{role}.weight"
            lam = np.linalg.svd(rng.standard_normal((48, 32)), compute_uv=False) ** 2
            alpha = 3.0 + 0.3 * depth + 0.1 * j
            status = "ok"
            if depth == 0 and role == "q":
                alpha = 1.5
            if depth == num_layers - 1 and role == "down":
                alpha = 7.5
            if depth == 1 and role == "v":
                status = "failed"
            layers.append(_layer(key, role, depth, lam, alpha, status, 1e-3 * (1 + j + depth)))
            esds[key] = lam
    emb_key = f"embeddings.{EVIL}.weight" if evil else "embeddings.word.weight"
    lam = np.linalg.svd(rng.standard_normal((64, 32)), compute_uv=False) ** 2
    layers.append(_layer(emb_key, "embedding", None, lam, 4.0, "ok", None))
    esds[emb_key] = lam
    return Analysis(
        source=f"/models/{EVIL}" if evil else "/models/tiny",
        layers=layers,
        summary=_summary(layers, evil),
        options={"mp_fit": False, "randomize": False},
        esds=esds,
        versions={"spectra": "0.1.0"},
    )


def _group(members: list[LayerMetrics]) -> GroupSummary:
    alphas = [lm.alpha for lm in members if lm.alpha is not None]
    return GroupSummary(
        count=len(members),
        mean_alpha=float(np.mean(alphas)) if alphas else None,
        median_alpha=float(np.median(alphas)) if alphas else None,
        warned=sum(1 for lm in members if lm.warnings),
    )


def _summary(layers: list[LayerMetrics], evil: bool) -> ModelSummary:
    roles = sorted({lm.role for lm in layers})
    depths = sorted({lm.layer for lm in layers if lm.layer is not None})
    warned = sum(1 for lm in layers if lm.warnings)
    alphas = [lm.alpha for lm in layers if lm.alpha is not None]
    standout_key = f"embeddings.{EVIL}.weight" if evil else layers[0].key
    return ModelSummary(
        num_matrices=len(layers),
        num_warned=warned,
        warned_share=warned / len(layers),
        mean_alpha=float(np.mean(alphas)),
        by_role={r: _group([lm for lm in layers if lm.role == r]) for r in roles},
        by_depth={d: _group([lm for lm in layers if lm.layer == d]) for d in depths},
        standouts=[{"key": standout_key, "metric": "alpha", "value": 4.0, "reason": EVIL}],
    )
