"""SODA's adapted weight W' written out with numpy from the paper's formulas (numpy's own SVD and QR, not the
code under test), for the SODA tests of every group (core, bake, ComfyUI)."""
import numpy as np

from fera_core.soda import IN, SVD


def orthogonal(n, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


def expected(w, layer):
    """The paper's W' = (S + dS) B R, written out with numpy for a (out, cols) matrix w."""
    ds = layer.spectrum.detach().double().numpy()
    r = np.ones((1, 1))
    for f in layer.rotation.matrices():
        r = np.kron(r, f.detach().double().numpy())
    k = len(ds)
    if layer.variant == SVD:  # W0 = U diag(s) V^T -> U diag(s + ds) V^T
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        adapted = u @ np.diag(s + ds) @ vt
    elif layer.side == IN:  # LQ: W0 = L Q with diag(L) >= 0 -> (L + diag(dl)) Q
        q, rr = np.linalg.qr(w.T)
        sign = np.where(np.diag(rr) < 0, -1.0, 1.0)
        lower, qm = (rr.T * sign), (q * sign).T
        lower[np.arange(k), np.arange(k)] += ds
        adapted = lower @ qm
    else:  # QR: W0 = Q T with diag(T) >= 0 -> Q (T + diag(dt))
        q, upper = np.linalg.qr(w)
        sign = np.where(np.diag(upper) < 0, -1.0, 1.0)
        q, upper = q * sign, upper * sign[:, None]
        upper[np.arange(k), np.arange(k)] += ds
        adapted = q @ upper
    return adapted @ r if layer.side == IN else r @ adapted
