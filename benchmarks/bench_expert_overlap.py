"""Cost of the report's expert similarity next to the spectrum the report computes anyway.

    .venv/bin/python benchmarks/bench_expert_overlap.py [--shape 14336x4096] [--shape 1408x2048]
        [--experts 2] [--k 16] [--threads 2]

For each `--shape` (out x in, a gate/up projection: the basis is on the input side), `--experts`
random Gaussian experts (a flat spectrum: the randomized SVD's hardest case) and one planted
near-copy: per expert, the seconds of `top_basis` (exact float64 SVD when min(m, n) <= 1024,
else the seeded block-Krylov randomized SVD) and of the report's spectrum (float64 Gram
eigenvalues, `exact_svdvals(route="gram64")`), then the overlap matrix of all of them. Prints a
table; the ratio basis / spectrum is the extra cost `--expert-sim` adds per expert. Not a test.
"""

from __future__ import annotations

import argparse
import time

import torch

from spectra.analysis.expert_overlap import EXACT_MAX_SIDE, effective_k, overlap_matrix, top_basis
from spectra.linalg.exact import exact_svdvals


def _shape(text: str) -> tuple[int, int]:
    m, n = text.lower().split("x")
    return int(m), int(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", type=_shape)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = args.shape or [(1408, 2048), (14336, 4096)]
    print(f"threads {args.threads}, k {args.k}, {args.experts} random experts + 1 near-copy")
    print(
        f"{'shape':>12} {'route':>10} {'basis s':>9} {'spectrum s':>11} {'ratio':>6} "
        f"{'copy overlap':>13} {'random overlap':>15} {'k/d':>6}"
    )
    for m, n in shapes:
        g = torch.Generator().manual_seed(0)
        experts = [torch.randn(m, n, generator=g) / n**0.5 for _ in range(args.experts)]
        experts.append(experts[0] + 1e-3 * torch.randn(m, n, generator=g) / n**0.5)
        k = effective_k(args.k, n)
        basis_s, spec_s, bases = 0.0, 0.0, []
        for W in experts[: args.experts]:
            t = time.perf_counter()
            bases.append(top_basis(W, "in", k))
            basis_s += time.perf_counter() - t
            t = time.perf_counter()
            exact_svdvals(W[None], route="gram64")
            spec_s += time.perf_counter() - t
        bases.append(top_basis(experts[-1], "in", k))
        mat = overlap_matrix(bases)
        route = "exact" if min(m, n) <= EXACT_MAX_SIDE else "randomized"
        basis_s, spec_s = basis_s / args.experts, spec_s / args.experts
        random_pair = float(mat[0, 1]) if args.experts > 1 else float("nan")
        print(
            f"{m:>6}x{n:<5} {route:>10} {basis_s:>9.2f} {spec_s:>11.2f} "
            f"{basis_s / spec_s:>6.2f} {float(mat[0, -1]):>13.4f} {random_pair:>15.4f} "
            f"{k / n:>6.4f}"
        )


if __name__ == "__main__":
    main()
