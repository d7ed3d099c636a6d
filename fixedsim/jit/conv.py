"""im2col: the patches of a batch of images as the rows of a matrix (K order: channel, kernel
row, kernel column), so that a convolution is one matrix product."""

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
