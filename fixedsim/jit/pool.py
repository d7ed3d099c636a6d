"""Max pooling: each window's first maximal element (row-major, NaN counting as the largest,
as ``numpy.argmax``) and the routing of the errors back to it; ReLU and its backward pass in
one pass each."""

from numba import prange

from .options import jit, jit_inline, jit_parallel


@jit_inline
def _later_wins(best, v):
    """Does ``v``, later in the window, replace ``best``: ``best`` is not NaN and ``v`` is NaN
    or larger (the first NaN, else the first maximum; ``-0.0`` and ``+0.0`` tie)."""
    return (best == best) & ((v != v) | (v > best))


@jit_parallel
def maxpool_forward(x, kh, kw, sh, sw, out, arg):
    """``out[n, c, ho, wo]`` = the maximum of the window at ``(ho*sh, wo*sw)``; ``arg`` its
    index ``i*kw + j`` in the window: the first NaN if there is one, else the first maximum
    (``-0.0`` and ``+0.0`` tie). Parallel over (image, channel). 2x2 windows of stride 2
    (the networks' pools) take a loop of their own without branches: 3.2 -> 2.0 ms for a
    LeNet's first pool at batch 64, one thread."""
    N, C = x.shape[:2]
    Ho, Wo = out.shape[2:]
    two = kh == 2 and kw == 2 and sh == 2 and sw == 2
    for nc in prange(N * C):
        n = nc // C
        c = nc - n * C
        for ho in range(Ho):
            if two:
                x0 = x[n, c, 2 * ho]
                x1 = x[n, c, 2 * ho + 1]
                orow = out[n, c, ho]
                arow = arg[n, c, ho]
                for wo in range(Wo):
                    best = x0[2 * wo]
                    bi = 0
                    v = x0[2 * wo + 1]
                    t = _later_wins(best, v)
                    best = v if t else best
                    bi = 1 if t else bi
                    v = x1[2 * wo]
                    t = _later_wins(best, v)
                    best = v if t else best
                    bi = 2 if t else bi
                    v = x1[2 * wo + 1]
                    t = _later_wins(best, v)
                    orow[wo] = v if t else best
                    arow[wo] = 3 if t else bi
                continue
            for wo in range(Wo):
                h0 = ho * sh
                w0 = wo * sw
                best = x[n, c, h0, w0]
                bi = 0
                for i in range(kh):
                    for j in range(kw):
                        v = x[n, c, h0 + i, w0 + j]
                        if _later_wins(best, v):
                            best = v
                            bi = i * kw + j
                out[n, c, ho, wo] = best
                arg[n, c, ho, wo] = bi


@jit_parallel
def maxpool_route(g, arg, kw, sh, sw, dx):
    """Non-overlapping windows: ``dx`` (``g``'s dtype; its values on entry do not matter) is
    zeroed, then receives each window's error at its argument, plus ``+0.0`` (as a sum onto a
    zero grid gives: ``-0.0`` becomes ``+0.0``). Parallel over (image, channel)."""
    N, C, Ho, Wo = g.shape
    for nc in prange(N * C):
        n = nc // C
        c = nc - n * C
        dx[n, c] = 0.0
        for ho in range(Ho):
            for wo in range(Wo):
                a = arg[n, c, ho, wo]
                i = a // kw
                dx[n, c, ho * sh + i, wo * sw + (a - i * kw)] = g[n, c, ho, wo] + 0.0


@jit
def relu_forward(x, out, keep):
    """``out = x`` where ``keep`` (``x`` positive or NaN), else ``+0.0``; ``keep`` as 0/1
    (``x``, ``out``, ``keep`` flat and contiguous). One pass, vectorised."""
    for i in range(x.size):
        v = x[i]
        k = not (v <= 0)
        keep[i] = k
        out[i] = v if k else 0.0


@jit
def relu_backward(g, keep, out):
    """``out = g`` where ``keep``, else ``+0.0`` (flat, contiguous). One pass, vectorised."""
    for i in range(g.size):
        out[i] = g[i] if keep[i] else 0.0
