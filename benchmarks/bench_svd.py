"""Decomposition benchmark: spectra's randomized/exact SVD vs torch and scikit-learn.

For each shape and k: time, worst relative error of the top-k singular values, and the worst
principal-angle cosine between the computed and the exact top-k left subspaces (1 = exact).
Test matrices have a planted decaying spectrum `S_i = i^-0.5` (methods.md section 1) with random
orthonormal singular vectors; the reference is a float64 `torch.linalg.svd`.

    python benchmarks/bench_svd.py                 # shapes scaled by 1/2 (2-core CPU)
    python benchmarks/bench_svd.py --scale 1       # 1024^2, 4096^2, 4096x11008, 14336x4096
    python benchmarks/bench_svd.py --device cuda --scale 1 --threads 0

`--scale s` multiplies every dimension except the 1024x1024 case (aspect ratios kept).
Not a test: numbers are printed as a Markdown table (and written with --out).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from spectra.linalg.exact import exact_svdvals
from spectra.linalg.rsvd import RSVDOptions, randomized_svd_info

FULL_SHAPES = [(1024, 1024), (4096, 4096), (4096, 11008), (14336, 4096)]
KS = (16, 64, 256)


def planted(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 `(m, n)` matrix with singular values i^-0.5 and random singular vectors; also
    returns the planted `U (m, r)` and `S (r,)`."""
    gen = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=gen)).Q
    S = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    return (U * S) @ V.T, U, S


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def accuracy(S: torch.Tensor, U: torch.Tensor | None, ref: tuple, k: int) -> tuple[float, float]:
    U_ref, S_ref = ref
    S = S.double().cpu()[:k]
    err = float(((S - S_ref[:k]).abs() / S_ref[:k]).max())
    if U is None:
        return err, float("nan")
    cos = torch.linalg.svdvals(U.double().cpu()[:, :k].T @ U_ref[:, :k]).min()
    return err, float(cos)


def methods(W: torch.Tensor, k: int) -> dict[str, Callable[[], tuple]]:
    """name -> callable returning (S, U or None)."""

    def ours(method: str) -> Callable[[], tuple]:
        def run() -> tuple:
            r = randomized_svd_info(W, k, RSVDOptions(method=method))
            return r.S[0], r.U[0], int(r.iterations[0])

        return run

    def lowrank(q: int, niter: int) -> Callable[[], tuple]:
        def run() -> tuple:
            torch.manual_seed(0)
            U, S, _ = torch.svd_lowrank(W, q=q, niter=niter)
            return S, U, niter

        return run

    def sklearn() -> tuple:
        from sklearn.utils.extmath import randomized_svd

        U, S, _ = randomized_svd(W.cpu().numpy(), k, random_state=0)
        return torch.from_numpy(S.copy()), torch.from_numpy(U.copy()), "auto"

    return {
        "spectra krylov (adaptive)": ours("krylov"),
        "spectra subspace (adaptive)": ours("subspace"),
        "torch.svd_lowrank q=k+10 niter=2": lowrank(k + 10, 2),
        "torch.svd_lowrank q=k niter=4 (PEFT)": lowrank(k, 4),
        "sklearn randomized_svd (default)": sklearn,
    }


def bench_shape(
    shape: tuple[int, int],
    device: torch.device,
    rows: list[str],
    ks: tuple[int, ...] = KS,
    planted_ref: bool = False,
) -> None:
    W, U_p, S_p = planted(*shape)
    if planted_ref:  # the planted factors (exact up to W's float32 rounding, ~1e-7)
        ref = (U_p.double(), S_p.double())
    else:
        U_ref, S_ref, _ = torch.linalg.svd(W.double(), full_matrices=False)
        ref = (U_ref, S_ref)
    Wd = W.to(device)
    t_svd, (U, S, _) = timed(lambda: torch.linalg.svd(Wd, full_matrices=False), device)
    t_vals, Sv = timed(lambda: torch.linalg.svdvals(Wd), device)
    t_gram, Sg = timed(lambda: exact_svdvals(Wd, route="gram64"), device)
    name = f"{shape[0]}x{shape[1]}"
    emit(rows, _row(name, "-", "torch.linalg.svd f32", t_svd, t_svd, accuracy(S, U, ref, 64)))
    emit(
        rows,
        _row(name, "-", "torch.linalg.svdvals f32", t_vals, t_svd, accuracy(Sv, None, ref, 64)),
    )
    emit(rows, _row(name, "-", "spectra gram64 values", t_gram, t_svd, accuracy(Sg, None, ref, 64)))
    for k in ks:
        if k >= min(shape) // 2:
            continue
        for label, fn in methods(Wd, k).items():
            t, (S, U, iters) = timed(fn, device)
            line = _row(name, str(k), f"{label} [{iters} it]", t, t_svd, accuracy(S, U, ref, k))
            emit(rows, line)


def emit(rows: list[str], line: str) -> None:
    print(line, flush=True)
    rows.append(line)


def _row(shape: str, k: str, method: str, t: float, t_svd: float, acc: tuple) -> str:
    err, cos = acc
    cos_s = "-" if cos != cos else f"{cos:.4f}"
    return f"| {shape} | {k} | {method} | {t:.3f} | {t_svd / t:.1f}x | {err:.1e} | {cos_s} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.5, help="dimension scale (1 = full shapes)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | mps")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = leave default)")
    ap.add_argument("--shape", action="append", default=None, help="MxN, repeatable (overrides)")
    ap.add_argument("--k", type=int, action="append", default=None, help="k, repeatable")
    ap.add_argument(
        "--planted-reference",
        action="store_true",
        help="compare with the planted U, S instead of a float64 SVD (saves minutes at 4096)",
    )
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = [FULL_SHAPES[0]] + [
        (int(m * args.scale), int(n * args.scale)) for m, n in FULL_SHAPES[1:]
    ]
    if args.shape:
        shapes = [tuple(int(d) for d in s.lower().split("x")) for s in args.shape]
    ks = tuple(args.k) if args.k else KS
    header = [
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"cpu={platform.processor() or platform.machine()} scale={args.scale}",
        "",
        "| shape | k | method | time s | speedup vs svd | top-k value err | worst cos |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows: list[str] = []
    for shape in shapes:
        bench_shape(shape, device, rows, ks, args.planted_reference)
    if args.out:
        args.out.write_text("\n".join(header + rows) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
