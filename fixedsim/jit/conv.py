"""im2col: the patches of a batch of images as the rows of a matrix (K order: channel, kernel
row, kernel column), so that a convolution is one matrix product."""

import numpy as np
from numba import prange

from .options import jit_parallel


@jit_parallel
def im2col(x, kh, kw, sh, sw, ph, pw, cols):
    """``cols[(n*Ho + ho)*Wo + wo, (c*kh + i)*kw + j] = x[n, c, ho*sh - ph + i, wo*sw - pw + j]``.

    Positions outside the image (the zero padding) give +0.0. Parallel over images.
    """
    N, C, H, W = x.shape
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    for n in prange(N):
        for ho in range(Ho):
            for wo in range(Wo):
                row = cols[(n * Ho + ho) * Wo + wo]
                for c in range(C):
                    for i in range(kh):
                        hh = ho * sh - ph + i
                        inside = 0 <= hh < H
                        for j in range(kw):
                            ww = wo * sw - pw + j
                            v = 0.0
                            if inside and 0 <= ww < W:
                                v = x[n, c, hh, ww]
                            row[(c * kh + i) * kw + j] = v


@jit_parallel
def col2im(cols, kh, kw, sh, sw, ph, pw, x):
    """The adjoint of :func:`im2col`: ``x[n, c, hh, ww] += cols[row, (c*kh + i)*kw + j]`` for
    every patch element that lies inside the image (``x`` zero on entry).

    Each pixel sums its contributions in row order, then (c, i, j) order. Parallel over images.
    """
    N, C, H, W = x.shape
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    for n in prange(N):
        for ho in range(Ho):
            for wo in range(Wo):
                row = cols[(n * Ho + ho) * Wo + wo]
                for c in range(C):
                    for i in range(kh):
                        hh = ho * sh - ph + i
                        if 0 <= hh < H:
                            for j in range(kw):
                                ww = wo * sw - pw + j
                                if 0 <= ww < W:
                                    x[n, c, hh, ww] += row[(c * kh + i) * kw + j]


@jit_parallel
def im2col_rows(x, kh, kw, Ho, Wo, rows, out):
    """``out[i] = cols[rows[i]]`` of :func:`im2col` with stride 1 and no padding (the rows
    of a transposed convolution's matrix that a second look needs), without the others."""
    C = x.shape[1]
    for i in prange(rows.size):
        r = rows[i]
        n = r // (Ho * Wo)
        ho = (r // Wo) % Ho
        wo = r % Wo
        row = out[i]
        for c in range(C):
            for a in range(kh):
                for b in range(kw):
                    row[(c * kh + a) * kw + b] = x[n, c, ho + a, wo + b]


@jit_parallel
def patch_norms(x, kh, kw, Ho, Wo, na):
    """``na[r]`` = the Euclidean norm of row ``r`` of :func:`im2col` with stride 1 and no
    padding, in float64: at each pixel the squares summed over the channels, then those sums
    over the window, then one square root (a sum of the row's ``C * kh * kw`` squares in one
    order). Parallel over images."""
    N, C, H, W = x.shape
    for n in prange(N):
        q = np.zeros((H, W))
        for c in range(C):
            xc = x[n, c]
            for h in range(H):
                for w in range(W):
                    q[h, w] += xc[h, w] * xc[h, w]
        for ho in range(Ho):
            for wo in range(Wo):
                s = 0.0
                for a in range(kh):
                    for b in range(kw):
                        s += q[ho + a, wo + b]
                na[(n * Ho + ho) * Wo + wo] = np.sqrt(s)
