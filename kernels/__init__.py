"""CUDA kernels for the per-frame hot path (`*.cu`), with NumPy references in `reference.py`.

preprocess.cu  uint8 frame -> resized, normalised CHW float32/float16 (OpenCV INTER_AREA semantics)
nn_min.cu      patch nearest neighbour, squared L2 with the min fused into the tiles
map_post.cu    anomaly-map bilinear upsample, Gaussian blur, max

`edge.cuda` compiles them with nvcc once per GPU architecture (cached on disk) and loads them with pycuda.
"""
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = {p.stem: p for p in sorted(KERNEL_DIR.glob("*.cu"))}
