"""The power-law fit's xmin search: every candidate's KS distance in full (the search before issue
19) vs the bounded search of `fit_powerlaw` (same winner, same bits), per ESD size.

ESDs: eigenvalues of ``W^T W`` for Student-t(3) entries (heavy-tailed, like trained layers) and a
Gaussian ``W`` (Marchenko-Pastur bulk), with ``N`` eigenvalues each, and Pareto samples. Printed:
median seconds of each search over ``--repeat`` runs, the ratio, and whether alpha, xmin and D are
equal (they must be, exactly).

    python benchmarks/bench_powerlaw.py                       # N = 512 .. 4096
    python benchmarks/bench_powerlaw.py --sizes 4096 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from spectra.analysis import powerlaw
from spectra.analysis.powerlaw import candidate_fits, fit_powerlaw


def esd(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "pareto":
        return rng.pareto(2.0, n) + 1.0
    w = rng.standard_t(3, size=(2 * n, n)) if kind == "student" else rng.standard_normal((2 * n, n))
    return np.linalg.eigvalsh(w.T @ w)


def full(evals: np.ndarray) -> tuple[float, float, float]:
    data = np.sort(evals[evals > powerlaw.EVALS_THRESH])
    alphas, ds = candidate_fits(data)
    i = int(np.argmin(ds))
    return float(alphas[i]), float(data[i]), float(ds[i])


def timed(fn, repeat: int):  # noqa: ANN001, ANN202
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512,1024,2048,4096")
    ap.add_argument("--kinds", default="student,gaussian,pareto")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| ESD | N | full search s | bounded s | speedup | same alpha, xmin, D |")
    print("|---|---:|---:|---:|---:|---|")
    for kind in args.kinds.split(","):
        for n in (int(s) for s in args.sizes.split(",")):
            evals = esd(kind, n, rng)
            t_full, ref = timed(lambda e=evals: full(e), args.repeat)
            t_new, fit = timed(lambda e=evals: fit_powerlaw(e), args.repeat)
            same = (fit.alpha, fit.xmin, fit.D) == ref
            print(
                f"| {kind} | {n} | {t_full:.4f} | {t_new:.4f} | {t_full / t_new:.1f}x | {same} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
