"""Memory bank of normal patch features and exact nearest-neighbour search.

Search is GEMM-shaped: ||q - b||^2 = ||q||^2 + ||b||^2 - 2 q.b, computed a block of the bank at a
time with BLAS, keeping only the running minimum, so memory stays bounded by `block_elements`
whatever the bank and batch sizes.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


class MemoryBank:
    """Normal patch features, optionally stored in a PCA projection (`mean`, `components`: C x k).

    Queries arrive with the encoder's C channels and are projected the same way before search. With
    `groups` > 1 the channels are that many equal blocks (one per encoder layer) searched separately:
    a query's distance is the mean over blocks of its nearest squared distance within each block.
    """

    def __init__(self, features: np.ndarray, mean: np.ndarray | None = None, components: np.ndarray | None = None,
                 groups: int = 1):
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"memory bank needs a non-empty M x C array, got shape {features.shape}")
        if (mean is None) != (components is None):
            raise ValueError("a projected bank needs both mean and components")
        if groups < 1 or features.shape[1] % groups or (groups > 1 and components is not None):
            raise ValueError(f"{groups} groups do not split {features.shape[1]} bank dims (or the bank is projected)")
        self.groups = groups
        if components is not None:
            components = np.ascontiguousarray(components, dtype=np.float32)
            mean = np.ascontiguousarray(mean, dtype=np.float32)
            if components.shape[1] != features.shape[1] or mean.shape != (components.shape[0],):
                raise ValueError(f"projection {components.shape} / mean {mean.shape} do not fit bank rows of "
                                 f"{features.shape[1]} dims")
        self.mean = mean
        self.components = components
        self.features = features
        # One GEMM gives ||b||^2 - 2 q.b directly: queries get a trailing 1, the bank is stored as
        # [-2 b, ||b||^2] per group, transposed so the GEMM reads it contiguously.
        blocks = []
        for g in np.split(features, groups, axis=1):
            blocks += [-2.0 * g, np.einsum("ij,ij->i", g, g)[:, None]]
        self._augmented_t = np.ascontiguousarray(np.concatenate(blocks, axis=1).T)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def channels(self) -> int:
        """Channels a query must have (the encoder's, before any projection)."""
        return self.components.shape[0] if self.components is not None else self.features.shape[1]

    @classmethod
    def with_pca(cls, features: np.ndarray, dims: int) -> "MemoryBank":
        """Bank stored in the top `dims` principal components of `features` (kept as is if already small)."""
        features = np.asarray(features, dtype=np.float32)
        if dims >= features.shape[1] or dims >= features.shape[0]:
            return cls(features)
        mean = features.mean(axis=0)
        _, _, vt = np.linalg.svd(features - mean, full_matrices=False)
        components = np.ascontiguousarray(vt[:dims].T)
        return cls((features - mean) @ components, mean, components)

    def project(self, queries: np.ndarray) -> np.ndarray:
        if self.components is None:
            return queries
        return (queries - self.mean) @ self.components

    def nearest_sqdist(self, queries: np.ndarray, block_elements: int = 1 << 20) -> np.ndarray:
        """Squared L2 distance of each query row to its nearest bank row (N,), float32, >= 0 (with
        groups: the mean over groups of the per-group nearest squared distance)."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.channels:
            raise ValueError(f"queries must be N x {self.channels}, got {queries.shape}")
        queries = self.project(queries)
        n, m = queries.shape[0], len(self)
        dims = self.features.shape[1] // self.groups
        total = np.zeros(n, np.float32)
        # Blocks of about `block_elements` distances (4 MB by default) stay in cache between the GEMM
        # and the min that consumes them.
        cols = min(m, 4096)
        rows = max(1, min(n, block_elements // cols))
        for g in range(self.groups):
            part = queries[:, g * dims:(g + 1) * dims]
            bank_t = self._augmented_t[g * (dims + 1):(g + 1) * (dims + 1)]
            augmented = np.empty((n, dims + 1), np.float32)
            augmented[:, :-1] = part
            augmented[:, -1] = 1.0
            best = np.full(n, np.inf, np.float32)
            for r0 in range(0, n, rows):
                q = augmented[r0:r0 + rows]
                out = best[r0:r0 + rows]
                for c0 in range(0, m, cols):
                    np.minimum(out, (q @ bank_t[:, c0:c0 + cols]).min(axis=1), out=out)
            best += np.einsum("ij,ij->i", part, part)
            np.maximum(best, 0.0, out=best)
            total += best
        if self.groups > 1:
            total /= self.groups
        return total


def greedy_coreset(features: np.ndarray, size: int, seed: int = 0, projection_dim: int = 32,
                   progress: Callable[[int], None] | None = None, rows: np.ndarray | None = None) -> np.ndarray:
    """Indices of `size` rows chosen by greedy k-center selection (PatchCore's coreset).

    Distances are computed in a random projection to `projection_dim` dims (Johnson-Lindenstrauss),
    which keeps each step a cheap matrix-vector product. `rows` restricts the choice to those row
    indices without copying them out of `features` (only their projection is held). Returns all
    candidate indices when size >= their number.
    """
    rows = np.arange(features.shape[0]) if rows is None else np.asarray(rows)
    n = len(rows)
    if size >= n:
        return rows
    rng = np.random.default_rng(seed)
    if features.shape[1] > projection_dim:
        proj = rng.standard_normal((features.shape[1], projection_dim)).astype(np.float32) / np.sqrt(projection_dim)
        reduced = np.empty((n, projection_dim), np.float32)
        for r0 in range(0, n, 65536):
            reduced[r0:r0 + 65536] = features[rows[r0:r0 + 65536]] @ proj
    else:
        reduced = np.ascontiguousarray(features[rows], dtype=np.float32)
    sq = np.einsum("ij,ij->i", reduced, reduced)
    chosen = np.empty(size, np.int64)
    chosen[0] = rng.integers(n)
    min_dist = np.full(n, np.inf, np.float32)
    step = max(1, size // 100)
    for i in range(1, size + 1):
        c = reduced[chosen[i - 1]]
        d = reduced @ c
        d *= -2.0
        d += sq
        d += sq[chosen[i - 1]]
        np.minimum(min_dist, d, out=min_dist)
        if i == size:
            break
        chosen[i] = int(np.argmax(min_dist))
        if progress is not None and i % step == 0:
            progress(step)
    if progress is not None:
        progress(size % step)
    return rows[chosen]
