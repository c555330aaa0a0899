"""NumPy reference for the CUDA kernel (nn_min.cu): the same arithmetic, written plainly, for tests and
benchmarks. It is also checked against the CPU path it replaces (`edge.scoring.bank`), so the kernel, the
reference and the CPU runtime agree.
"""
from __future__ import annotations

import numpy as np


def nn_min_sqdist(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each query to its nearest bank row, by the expansion the kernel uses."""
    q = queries.astype(np.float64)
    b = bank.astype(np.float64)
    d = (b * b).sum(1)[None, :] - 2 * q @ b.T
    return np.maximum(d.min(1) + (q * q).sum(1), 0).astype(np.float32)
