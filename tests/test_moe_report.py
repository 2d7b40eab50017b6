"""MoE in the report: routed experts grouped by layer, expert and role; the router and shared
experts apart; expert similarity (top-k subspace overlap) against float64 SVD references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _moe_fixtures import HIDDEN, planted_experts, write_planted_experts, write_transformers_moe

from spectra.analysis.expert_overlap import REDUNDANT, effective_k, overlap_matrix, top_basis
from spectra.analysis.moe import moe_summary
from spectra.analysis.results import Analysis
from spectra.jobs.report import AnalyzeOptions, analyze
from spectra.sources.checkpoint import Checkpoint


def _reference_overlap(mats: list[torch.Tensor], side: str, k: int) -> np.ndarray:
    """||P_i^T P_j||_F^2 / k from numpy's float64 full SVD, written out independently."""
    bases = []
    for W in mats:
        U, _, Vh = np.linalg.svd(W.double().numpy(), full_matrices=False)
        bases.append(U[:, :k] if side == "out" else Vh[:k].T)
    n = len(bases)
    return np.array(
        [[np.sum((bases[i].T @ bases[j]) ** 2) / k for j in range(n)] for i in range(n)]
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Analysis]:
    folder = write_planted_experts(tmp_path_factory.mktemp("moe") / "planted")
    return folder, analyze(folder, AnalyzeOptions(expert_overlap=4), cache=False)


def test_experts_grouped_by_layer_and_role(planted: tuple[Path, Analysis]) -> None:
    _, an = planted
    moe = an.moe
    assert moe is not None
    assert moe.num_experts == {0: 4, 1: 3}
    cells = [(g.layer, g.expert_role, g.experts) for g in moe.groups]
    assert cells == [
        (0, "gate", (0, 1, 2, 3)),
        (0, "up", (0, 1, 2, 3)),
        (0, "down", (0, 1, 2, 3)),
        (1, "gate", (0, 1, 2)),
        (1, "up", (0, 1, 2)),
        (1, "down", (0, 1, 2)),
    ]
    by_key = {lm.key: lm for lm in an.layers}
    g = moe.groups[2]
    assert g.keys[3] == "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    assert g.alphas == tuple(by_key[k].alpha for k in g.keys)
    # aggregates are over routed experts only: the routers are listed, never averaged in
    assert moe.routers == (
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.gate.weight",
    )
    assert by_key[moe.routers[0]].role == "router"
    assert moe.by_expert_role["down"].count == 7 and moe.by_layer[0].count == 12
    routed = [lm.alpha for lm in an.layers if lm.role == "expert" and lm.alpha is not None]
    assert moe.by_layer[0].count + moe.by_layer[1].count == 21
    assert an.summary.by_role["router"].count == 2
    mean = np.mean([a for k, a in zip(g.keys, g.alphas, strict=True) if a is not None])
    assert g.summary.mean_alpha == pytest.approx(mean, rel=1e-12)
    assert len(routed) == sum(x.count for x in moe.by_layer.values()) - sum(
        1 for lm in an.layers if lm.role == "expert" and lm.alpha is None
    )


def test_planted_redundancy_against_float64_svd(planted: tuple[Path, Analysis]) -> None:
    _, an = planted
    t = planted_experts()
    k = effective_k(4, HIDDEN)
    assert k == 4
    for group in an.moe.groups:
        name = {"gate": "w1", "up": "w3", "down": "w2"}[group.expert_role]
        mats = [
            t[f"model.layers.{group.layer}.block_sparse_moe.experts.{e}.{name}.weight"]
            for e in group.experts
        ]
        side = "out" if group.expert_role == "down" else "in"
        want = _reference_overlap(mats, side, k)
        got = np.asarray(group.overlap.overlap)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
        assert group.overlap.side == side and group.overlap.k == k
        assert group.overlap.baseline == k / HIDDEN
        redundant = {(i, j) for i, j, _ in group.overlap.redundant}
        if group.layer == 0:
            # expert 1: expert 0 with permuted hidden units; expert 2: 1e-3 noise on it
            assert got[0, 1] == pytest.approx(1.0, abs=1e-10)
            assert got[0, 2] > 0.99
            assert redundant == {(0, 1), (0, 2), (1, 2)}
            assert got[0, 3] < 0.5 and got[1, 3] < 0.5
        else:
            # independent experts: near the random baseline k/d = 1/8, far below REDUNDANT
            assert redundant == set()
            off = got[~np.eye(3, dtype=bool)]
            assert off.max() < 0.5 < REDUNDANT


def test_overlap_of_independent_random_subspaces_is_near_k_over_d() -> None:
    g = torch.Generator().manual_seed(1)
    d, k = 256, 8
    bases = [
        torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0] for _ in range(40)
    ]
    mat = overlap_matrix(bases)
    off = mat[~np.eye(40, dtype=bool)]
    assert abs(off.mean() - k / d) < 0.25 * k / d  # E = k/d for uniform random subspaces
    np.testing.assert_allclose(np.diag(mat), 1.0, atol=1e-12)


def test_randomized_basis_matches_exact_on_a_gapped_spectrum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import spectra.analysis.expert_overlap as eo

    g = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(96, 64, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(80, 64, generator=g, dtype=torch.float64))[0]
    S = torch.cat([torch.linspace(10, 5, 6), torch.linspace(1, 0.1, 58)]).double()
    W = (U * S) @ V.T
    exact = top_basis(W, "in", 6)
    monkeypatch.setattr(eo, "EXACT_MAX_SIDE", 8)  # forces the randomized route
    approx = top_basis(W.float(), "in", 6)
    assert overlap_matrix([exact, approx])[0, 1] == pytest.approx(1.0, abs=1e-5)


def test_overlap_off_and_json_round_trip(planted: tuple[Path, Analysis], tmp_path: Path) -> None:
    folder, an = planted
    back = Analysis.from_json(an.to_json())
    assert back.moe == an.moe
    off = analyze(folder, AnalyzeOptions(expert_overlap=0, roles=("down", "router")), cache=False)
    assert off.moe is not None and all(g.overlap is None for g in off.moe.groups)
    assert [g.expert_role for g in off.moe.groups] == ["down", "down"]
    assert len(off.moe.routers) == 2
    dense = analyze(folder, AnalyzeOptions(roles=("q",)), cache=False)
    assert dense.moe is None and "moe" not in dense.to_dict()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_transformers_moe_checkpoints_roles(tmp_path: Path, kind: str) -> None:
    """The layouts transformers 5 writes: routers marked, shared experts apart, experts
    grouped per layer (gpt-oss: fused 3-D stacks split per expert)."""
    folder = write_transformers_moe(tmp_path / kind, kind)
    with Checkpoint.open(folder) as ckpt:
        mats = ckpt.matrices()
    roles = {m.key: (m.role, m.expert, m.expert_role) for m in mats}
    routers = sorted(k for k, r in roles.items() if r[0] == "router")
    shared = sorted(k for k, r in roles.items() if r[0] == "shared_expert")
    experts = [r for r in roles.values() if r[0] == "expert"]
    want_router = {
        "mixtral": "model.layers.{}.block_sparse_moe.gate.weight",
        "qwen2_moe": "model.layers.{}.mlp.gate.weight",
        "gpt_oss": "model.layers.{}.mlp.router.weight",
    }[kind]
    extra = ["model.layers.{}.mlp.shared_expert_gate.weight"] if kind == "qwen2_moe" else []
    assert routers == sorted(p.format(i) for p in [want_router, *extra] for i in range(2))
    if kind == "qwen2_moe":
        assert shared == sorted(
            f"model.layers.{i}.mlp.shared_expert.{p}_proj.weight"
            for i in range(2)
            for p in ("gate", "up", "down")
        )
        assert {roles[k][2] for k in shared} == {"gate", "up", "down"}
    else:
        assert shared == []
    per_layer = 4 * (2 if kind == "gpt_oss" else 3)
    assert len(experts) == 2 * per_layer
    assert not any(
        r[0] in ("gate", "up", "down", "other") and "expert" in k for k, r in roles.items()
    )
    an = analyze(folder, AnalyzeOptions(expert_overlap=4, outliers=False), cache=False)
    assert an.moe.num_experts == {0: 4, 1: 4}
    assert set(an.moe.routers) == set(routers) and set(an.moe.shared) == set(shared)
    assert all(g.overlap is not None and not g.overlap.redundant for g in an.moe.groups)


def test_moe_summary_none_without_experts(planted: tuple[Path, Analysis]) -> None:
    _, an = planted
    assert moe_summary([lm for lm in an.layers if lm.role != "expert"]) is None


def test_report_pages_show_the_moe_section(planted: tuple[Path, Analysis], tmp_path: Path) -> None:
    import json

    from spectra.reports.html import fmt
    from spectra.reports.report import write_report

    _, an = planted
    write_report(an, tmp_path / "r", formats="html,md,json", max_esd_plots=0)
    md = (tmp_path / "r" / "report.md").read_text()
    html = (tmp_path / "r" / "report.html").read_text()
    data = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert data["moe"] == an.moe.to_dict()
    assert data["moe"]["groups"][0]["overlap"]["redundant"][0][:2] in ([0, 1], [0, 2], [1, 2])
    assert "## Mixture of experts" in md and 'id="moe"' in html and 'href="#moe"' in html
    gate0 = an.moe.groups[0]
    # the layer 0 table: one row per expert, alpha of gate / up / down
    row3 = f"| 3 | {fmt(gate0.alphas[3])} | {fmt(an.moe.groups[1].alphas[3])} | "
    assert row3 in md
    assert "redundant pairs: 0–1 (1.000)" in md.replace("1–0", "0–1")
    for key in an.moe.routers:
        assert key.replace("_", "\\_") in md and key in html
    assert "Router and shared experts" in md


def test_cli_report_moe_and_cached_rerun(planted: tuple[Path, Analysis], tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from spectra.cli.main import app

    folder, _ = planted
    cache = tmp_path / "cache"
    args = ["report", str(folder), "--format", "json,md", "--cache-dir", str(cache), "-q"]
    first = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a"), "--expert-sim", "4"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b"), "--expert-sim", "4"])
    assert again.exit_code == 0, again.output
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["moe"] == b["moe"] and a["options"]["expert_overlap"] == 4
    assert "## Mixture of experts" in (tmp_path / "b" / "report.md").read_text()
    bad = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c"), "--expert-sim", "-1"])
    assert bad.exit_code == 2 and "expert_overlap must be >= 0" in bad.output
