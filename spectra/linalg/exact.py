"""Exact spectra of batches of equal-shape matrices: `svdvals`, float64 Gram eigenvalues, full SVD.

Routes (docs/methods.md section 1):
- "svdvals": `torch.linalg.svdvals` in the working precision (float32 for low-precision inputs).
  Absolute error about `eps * S_1`: in float32 the small singular values of the bulk are off.
- "gram64": eigenvalues of the float64 Gram matrix of the smaller side (`W^T W` or `W W^T`),
  clamped at 0, square-rooted, descending. Squaring doubles the exponent range but float64 keeps
  the absolute eigenvalue error near `eps64 * S_1^2`, so every eigenvalue `S_i^2` above the 1e-5
  cut used by the power-law fits is exact to ~1e-9 relative for `S_1` of order 10. On a 2-core CPU
  it is about 2x faster than float32 `svdvals`. The Gram matrix is summed over slices of at most
  GRAM_SLICE_BYTES (float64) of the long side, so a full float64 copy of a large W is never made.
- "auto": gram64, except on devices without float64 (MPS), where it is svdvals.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from spectra.errors import ValidationError
from spectra.linalg.checks import as_batch, check_finite, check_names, work_dtype

ROUTES = ("auto", "svdvals", "gram64")
# Largest float64 slice of W the gram64 route materializes at once: the float64 copy of a
# 32000 x 4096 embedding would be 1 GiB on top of the input; slices of <= 64 MiB cost the same
# flops (one GEMM per slice) and bound the extra memory by the Gram matrix itself.
GRAM_SLICE_BYTES = 64 << 20
# Column panel of the lower-triangle Gram accumulation (M > GRAM_PANEL only; smaller Gram
# matrices are one product): 512 and 1024 measured equally fast on one CPU thread for M = 4096.
GRAM_PANEL = 512


def resolve_route(route: str, device: torch.device) -> str:
    """The concrete route ("svdvals" or "gram64") that `route` means on `device`."""
    if route not in ROUTES:
        raise ValidationError(f"route must be one of {ROUTES}, got {route!r}")
    if route != "auto":
        return route
    return "svdvals" if device.type == "mps" else "gram64"


def exact_svdvals(
    W: torch.Tensor,
    *,
    route: str = "auto",
    dtype: torch.dtype | None = None,
    names: Sequence[str] | None = None,
) -> torch.Tensor:
    """All singular values of `W (m, n)` or `W (b, m, n)`: `S (.., min(m, n))`, float64,
    descending, on W's device.

    route: "auto" | "svdvals" | "gram64" (see the module docstring for accuracy and speed).
    dtype: working precision of the "svdvals" route (float32 or float64; default float32 for
        low-precision inputs, W's own otherwise). "gram64" always works in float64.

    >>> W = torch.diag(torch.tensor([3.0, 1.0, 2.0]))
    >>> exact_svdvals(W).tolist()
    [3.0, 2.0, 1.0]
    """
    Wb, single = as_batch(W)
    check_names(names, Wb.shape[0])
    check_finite(Wb, names)
    chosen = resolve_route(route, Wb.device)
    if chosen == "gram64":
        S = gram_svdvals(Wb)
    else:
        S = torch.linalg.svdvals(Wb.to(work_dtype(Wb, dtype))).double()
    return S[0] if single else S


def gram_svdvals(
    W: torch.Tensor, *, block: int | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """`(b, min(m, n))` float64 singular values from the eigenvalues of the smaller Gram matrix
    of `W (b, m, n)` (no validation: callers check). W may be in any floating dtype (bf16, fp16,
    float32, float64); each entry is upcast to float64 exactly.

    block: accumulate the Gram matrix over slices of `block` rows (tall W: `G = sum W_i^T W_i`)
        or columns (wide W: `G = sum W_j W_j^T`) of the long side, so only one float64 slice
        `(b, block, M)` exists at a time instead of a float64 copy of all of W. Same result up
        to the summation order (float64: ~1e-15 relative to S_1^2). None: `gram_block(W.shape)`,
        i.e. slices of at most GRAM_SLICE_BYTES, and no slicing for batches below that size.
    device: where the Gram matrix is formed and diagonalized (default W's); with `block`, W may
        stay on the CPU and only one slice at a time is moved there.

    Memory beyond W: the Gram matrix, the copy `eigvalsh` works on (`2 * 8 * b * M^2` bytes
    together) and one float64 slice.

    >>> W = torch.randn(2, 50, 3, dtype=torch.float64)
    >>> torch.allclose(gram_svdvals(W, block=7), torch.linalg.svdvals(W))
    True
    """
    dev = W.device if device is None else device
    m, n = W.shape[-2:]
    if block is None:
        block = gram_block(tuple(W.shape))
    if block is None and min(m, n) > GRAM_PANEL:
        block = max(m, n)  # one slice, lower triangle only
    if block is None:
        W64 = W.to(dev, torch.float64)
        G = W64.mT @ W64 if m >= n else W64 @ W64.mT  # (b, M, M)
        del W64
    else:
        G = _chunked_gram(W, block, dev)
    ev = torch.linalg.eigvalsh(G)  # ascending
    return ev.clamp_min(0).sqrt().flip(-1)


def gram_block(shape: tuple[int, ...], *, slice_bytes: int | None = None) -> int | None:
    """Slice length (rows or columns of the long side) that keeps one float64 slice of a
    `(b, m, n)` batch within `slice_bytes` (default GRAM_SLICE_BYTES), or None when the whole
    batch in float64 fits it (then the Gram matrix is one product).

    >>> gram_block((1, 32000, 4096))  # the float64 copy would be 1 GiB
    2048
    >>> gram_block((30, 384, 384)) is None
    True
    """
    limit = GRAM_SLICE_BYTES if slice_bytes is None else int(slice_bytes)
    b, m, n = shape if len(shape) == 3 else (1, *shape)
    if 8 * b * m * n <= limit:
        return None
    return max(1, limit // (8 * b * min(m, n)))


def _chunked_gram(W: torch.Tensor, block: int, device: torch.device) -> torch.Tensor:
    """`(b, M, M)` float64 Gram matrix of the smaller side, summed over slices of the long side.

    Only the lower triangle is formed when M > GRAM_PANEL (what `eigvalsh` reads, its default
    `UPLO="L"`): column panels of GRAM_PANEL, each the product of the columns from the panel on
    with the panel, about 0.56-0.67x the flops and time of the full product (measured 3.2 s vs
    4.8 s for 8192 x 4096 on one thread). The upper triangle outside the diagonal panels is 0.
    """
    b, m, n = W.shape
    tall = m >= n

    def part(start: int, stop: int) -> torch.Tensor:
        piece = W[:, start:stop, :] if tall else W[:, :, start:stop]
        return piece.to(device, torch.float64)

    return _gram_of_slices(part, (b, m, n), block, device)


def _gram_of_slices(
    part: Callable[[int, int], torch.Tensor],
    shape: tuple[int, int, int],
    block: int,
    device: torch.device,
) -> torch.Tensor:
    """The chunked Gram matrix of `_chunked_gram` for a `(b, m, n)` matrix given by its float64
    slices: `part(start, stop)` is `(b, stop - start, n)` (tall) or `(b, m, stop - start)`
    (wide), on `device`."""
    b, m, n = shape
    tall = m >= n
    M, L = (n, m) if tall else (m, n)
    G = torch.zeros((b, M, M), dtype=torch.float64, device=device)
    step = max(1, int(block))
    for start in range(0, L, step):
        piece = part(start, min(start + step, L))  # (b, step, M) tall, (b, M, step) wide
        P = piece if tall else piece.mT  # (b, step, M): G += P^T P
        for j in range(0, M, GRAM_PANEL):
            G[:, j:, j : j + GRAM_PANEL].baddbmm_(P[:, :, j:].mT, P[:, :, j : j + GRAM_PANEL])
        del piece, P
    return G


def gram_svdvals_diff(W1: torch.Tensor, W0: torch.Tensor) -> torch.Tensor:
    """`(min(m, n),)` float64 singular values of the difference `W1 - W0` of two `(m, n)`
    matrices, as `gram_svdvals((W1 - W0)[None])[0]` computes them on float64 inputs, bit for bit,
    but without a float64 copy of either matrix or of the difference when the difference is
    over GRAM_SLICE_BYTES in float64: its Gram matrix is summed over slices of the long side,
    each slice of `W1 - W0` formed in float64 (exact upcasts, one rounding per entry, as for
    float64 inputs). W1 and W0 may be in any floating dtype. No validation: callers check shapes
    and finiteness.

    >>> A, B = torch.randn(300, 20), torch.randn(300, 20)
    >>> d = (A.double() - B.double())[None]
    >>> torch.equal(gram_svdvals_diff(A, B), gram_svdvals(d)[0])
    True
    """
    dev = W1.device
    m, n = (int(x) for x in W1.shape)
    block = gram_block((1, m, n))
    if block is None and min(m, n) > GRAM_PANEL:
        block = max(m, n)  # one slice, lower triangle only (as gram_svdvals)
    if block is None:
        D = (W1.to(dev, torch.float64) - W0.to(dev, torch.float64))[None]
        G = D.mT @ D if m >= n else D @ D.mT
        del D
    else:
        tall = m >= n

        def part(start: int, stop: int) -> torch.Tensor:
            rows = slice(start, stop) if tall else slice(None)
            cols = slice(None) if tall else slice(start, stop)
            d = W1[rows, cols].to(dev, torch.float64, copy=True)  # never W1 itself
            return d.sub_(W0[rows, cols].to(dev, torch.float64))[None]  # two slices at a time

        G = _gram_of_slices(part, (1, m, n), block, dev)
    ev = torch.linalg.eigvalsh(G)[0]  # ascending
    return ev.clamp_min(0).sqrt().flip(-1)


def gram_eigh(
    G: torch.Tensor, vectors: int, *, which: str = "top"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and vectors from the symmetric Gram matrix ``G (M, M)`` (``W W^T`` or
    ``W^T W``): all ``S (M,)`` descending (eigenvalues clamped at 0, square-rooted), and the
    eigenvectors ``(M, vectors)`` of the ``vectors`` largest (``which="top"``) or smallest
    (``"bottom"``) eigenvalues, ordered as in ``S`` (largest first). One ``torch.linalg.eigh``.

    Measured and rejected: LAPACK's subset driver (``dsyevr`` through scipy) computes only the
    wanted vectors and was 1.1-1.6x faster at one thread, but scipy's OpenBLAS thread pool and
    torch's OpenMP pool then spin against each other: at 2 threads a MiniLM comparison took 0.67 s
    instead of 0.35 s (full fine-tune: 4.71 s vs 2.76 s). One thread pool it is.
    """
    if which not in ("top", "bottom"):
        raise ValidationError(f"which must be 'top' or 'bottom', got {which!r}")
    M = int(G.shape[-1])
    evals, evecs = torch.linalg.eigh(G)  # ascending
    picked = evecs[:, M - vectors :] if which == "top" else evecs[:, :vectors]
    return evals.clamp_min(0).sqrt().flip(-1), picked.flip(-1)


def gram_left_svd(W: torch.Tensor, *, top: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and all singular values of one `W (m, n)` from a float64 symmetric
    eigendecomposition (float32 on devices without float64): `U (m, M')`, `S (M,)` descending,
    `M = min(m, n)`; `U` has `M` columns, or the first `top` of them when `top` is given.
    W may be in any floating dtype (upcast exactly). No validation: callers check finiteness.
    Used by compare (drift.py), where the left vectors of a tall matrix must stay orthonormal;
    `exact_svd_slice` is the two-sided slice of init.

    - wide or square (m <= n): `eigh(W W^T)`, an (m, m) problem whose eigenvectors are U. The
      Gram matrix is one product when W in float64 fits GRAM_SLICE_BYTES, else summed over
      column slices of that size (no float64 copy of W).
    - tall (m > n): thin QR `W = Q R`, then `eigh(R R^T)` (n, n) (`= Q^T W W^T Q`), `U = Q U_R`:
      never an (m, m) problem, and U stays orthonormal to working precision (`W V / S` would lose
      orthogonality on the small singular values). On the CPU the QR runs in one float64
      column-major buffer that W is upcast into (LAPACK's geqrf and orgqr in place), and the full
      U is written back into that buffer in row blocks of GRAM_SLICE_BYTES (`U = Q U_R`, the same
      bits as one product): one `m x n` float64 array in all, where the route through
      `torch.linalg.qr` held three (the float64 copy of W, Q, then U). The full U is then
      column-major (as LAPACK's Q); `top` vectors are a new row-major `(m, top)` array.

    Accuracy (methods.md section 1): values carry the Gram route's absolute error `eps * S_1^2` on
    `S_i^2`; a vector `u_i` is accurate to about `eps * S_1^2 / gap_i`, where `gap_i` is the
    distance from `S_i^2` to its nearest neighbour: well-separated top vectors are exact to
    ~1e-12, vectors inside a cluster of near-equal values are (as with any SVD) only defined up
    to a rotation within the cluster. On 2 CPU threads, against the float64 `torch.linalg.svd`:
    7x faster for 1024 x 2816 (0.22 s vs 1.54 s), 1.9x for 2048 x 2048, 1.2-1.3x for tall
    matrices (where LAPACK's SVD also starts with a QR); no right vectors are ever formed.

    >>> W = torch.randn(40, 7, dtype=torch.float64)
    >>> U, S = gram_left_svd(W)
    >>> torch.allclose(S, torch.linalg.svdvals(W)) and U.shape == (40, 7)
    True
    """
    m, n = (int(x) for x in W.shape)
    if W.device.type == "mps":  # no float64, no in-place LAPACK: the plain float32 route
        return _left_svd_plain(W.to(torch.float32), top)
    if m <= n:
        block = gram_block((1, m, n))
        G = _chunked_gram(W[None], block, W.device)[0] if block is not None else None
        if G is None:
            W64 = W.to(torch.float64)
            G = W64 @ W64.mT  # (m, m)
            del W64
        S, U = gram_eigh(G, m if top is None else max(0, min(int(top), m)))
        return U.contiguous(), S
    if W.device.type != "cpu":
        return _left_svd_plain(W.to(torch.float64), top)
    Q, R = qr_in_place(W)
    G = R @ R.mT
    del R  # not held while eigh works
    S, U = gram_eigh(G, n if top is None else max(0, min(int(top), n)))
    del G
    if top is not None:
        return (Q @ U).contiguous(), S
    step = max(1, GRAM_SLICE_BYTES // (8 * n))
    for start in range(0, m, step):
        Q[start : start + step] = Q[start : start + step] @ U
    return Q, S


def qr_in_place(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin QR of a tall or square `W (m, n)` (m >= n, CPU) in one float64 column-major buffer
    that W is upcast into: `(Q (m, n), R (n, n))`, the same LAPACK calls (geqrf, orgqr) and bits
    as `torch.linalg.qr(W.double())`, without its float64 copy of W beside Q."""
    m, n = (int(x) for x in W.shape)
    buf = torch.empty((n, m), dtype=torch.float64, device=W.device).mT  # column-major (m, n)
    buf.copy_(W)
    tau = torch.empty(n, dtype=torch.float64, device=W.device)
    torch.geqrf(buf, out=(buf, tau))
    R = buf[:n].triu()
    torch.linalg.householder_product(buf, tau, out=buf)
    return buf, R


def _left_svd_plain(W: torch.Tensor, top: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`gram_left_svd` on a device without in-place LAPACK (MPS, CUDA): `W` in its working
    dtype, one product or `torch.linalg.qr`."""
    m, n = W.shape
    basis = None
    if m <= n:
        G = W @ W.mT  # (m, m)
    else:
        basis, R = torch.linalg.qr(W)  # (m, n), (n, n)
        G = R @ R.mT
    M = int(G.shape[0])
    S, U = gram_eigh(G, M if top is None else max(0, min(int(top), M)))
    if basis is not None:
        U = basis @ U
    return U.contiguous(), S


def exact_svd_slice(
    W: torch.Tensor, rank: int, which: str = "top"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Exact top or bottom ``rank`` singular triplets of ``W (m, n)`` in float64:
    ``U (m, r), S (r,) descending, Vh (r, n)`` and the route taken. Used by init (PiSSA's exact
    route, MiLoRA's bottom components).

    Route "gram64": eigenvectors of the smaller float64 Gram matrix (``W W^T`` when m < n, else
    ``W^T W``) give one side, the other is ``W v_i / s_i``. About 8x faster than a float64 SVD on
    MiniLM shapes (0.26 s vs 2.0 s for 1536 x 384 on 2 busy cores) and accurate when
    ``s_i >> sqrt(eps64) s_1``: the eigenvalue error is about ``eps64 s_1^2`` (methods.md section
    1). Kept components below ``1e-6 s_1`` (nearly rank-deficient matrices, MiLoRA's bottom) fall
    back to the full float64 SVD, route "svd64". MPS has no float64: W moves to the CPU.

    Memory (gram64): W's float64 upcast is made twice and held through neither's neighbour:
    once for the Gram product (then dropped) and once for the other side's product, after the
    eigendecomposition (G, eigh's copy of it and LAPACK's workspace: `4 * 8 * M^2` bytes
    together) has freed its buffers. Same operations on the same operands as holding one
    upcast throughout, so the same bits; for an 11008 x 4096 float32 W (MiLoRA on a 7B up_proj)
    the upcast is 344 MiB that no longer sits beside eigh's 512 MiB.
    """
    src = W.cpu() if W.device.type == "mps" else W
    m, n = (int(x) for x in src.shape)
    wide = m < n
    G = _whole_gram64(src, wide)  # (M, M)
    M = int(G.shape[0])
    S_all, vecs = gram_eigh(G, rank, which=which)
    del G
    S = S_all[:rank] if which == "top" else S_all[M - rank :]  # descending within the slice
    top = float(S_all[0]) if M else 0.0
    if S.numel() == 0 or float(S[-1]) <= 1e-6 * top:
        U, S_full, Vh = exact_svd(src.double(), dtype=torch.float64)
        pick = slice(0, rank) if which == "top" else slice(S_full.numel() - rank, None)
        return U[:, pick], S_full[pick], Vh[pick], "svd64"
    S = S.clone()
    W64 = src.double()  # the upcast again, now that eigh's buffers are gone
    other = (vecs.T @ W64) / S.unsqueeze(1) if wide else (W64 @ vecs) / S  # the other side
    del W64
    if wide:
        return vecs, S, other, "gram64"  # U (m, r), Vh (r, n)
    return other, S, vecs.T, "gram64"


def _whole_gram64(W: torch.Tensor, wide: bool) -> torch.Tensor:
    """`W W^T` (wide) or `W^T W` of the float64 upcast of `W (m, n)`, one product; the upcast
    is freed on return (when W is not float64 already)."""
    W64 = W.double()
    return W64 @ W64.T if wide else W64.T @ W64


def exact_svd(
    W: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    full_matrices: bool = False,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full SVD `W = U diag(S) Vh` of `W (m, n)` or a batch, computed in `dtype` (default
    float64): `U (.., m, M)`, `S (.., M)` descending, `Vh (.., M, n)` with `M = min(m, n)`
    (`full_matrices=True` gives square `U`, `Vh`). Intruder detection needs the full base `U`,
    MiLoRA the bottom components; a randomized top-k serves neither.

    >>> U, S, Vh = exact_svd(torch.eye(3) * 2)
    >>> S.tolist()
    [2.0, 2.0, 2.0]
    """
    Wb, single = as_batch(W)
    check_names(names, Wb.shape[0])
    check_finite(Wb, names)
    U, S, Vh = torch.linalg.svd(Wb.to(work_dtype(Wb, dtype)), full_matrices=full_matrices)
    if single:
        return U[0], S[0], Vh[0]
    return U, S, Vh
