"""Feature extraction: frames -> the pack's encoder (any Backend) -> patch features, channels last, in
batches. The first half of every scorer; knows nothing of banks, maps or thresholds."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge.inference.backend import Backend, create_backend
from edge.inference.preprocess import to_batch
from edge.pack import Pack


class FeatureExtractor:
    """The pack's encoder as patch features for the bank: `patch_features` for one batch,
    `patch_features_batched` for many images into one preallocated array."""

    def __init__(self, pack: Pack, backend: Backend | None = None):
        self.pack = pack
        self.backend = backend or create_backend(pack)

    def patch_features(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """N frames -> N x h x w x C float32 patch features (channels last, ready for the bank)."""
        feats = self.backend.run(to_batch(list(images), self.pack.input))
        return np.ascontiguousarray(feats.transpose(0, 2, 3, 1))

    def patch_features_batched(self, images: Sequence[np.ndarray], batch_size: int = 8, progress=None) -> np.ndarray:
        """All images' patch features in one preallocated N x h x w x C array (no concatenation copy)."""
        out = None
        for b0 in range(0, len(images), batch_size):
            feats = self.patch_features(images[b0:b0 + batch_size])
            if out is None:
                out = np.empty((len(images), *feats.shape[1:]), np.float32)
            out[b0:b0 + len(feats)] = feats
            if progress:
                progress(len(feats))
        if out is None:
            raise ValueError("no images to extract features from")
        return out
