"""CUDA kernels the runtime uses (`*.cu`), with NumPy references in `reference.py`.

nn_min.cu      patch nearest neighbour, squared L2 with the min fused into the tiles (edge.inference.cuda.GpuMemoryBank)

Every kernel here is launched by the runtime (tests/test_kernels.py checks it). Preprocessing and map
post-processing kernels were removed: nothing called them (frames arrive in host memory, where
OpenCV does both), and on a GPU the encoder's backend is where such work belongs.

`edge.inference.cuda` compiles them with nvcc once per GPU architecture (cached on disk) and loads them with pycuda.
"""
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent
SOURCES = {p.stem: p for p in sorted(KERNEL_DIR.glob("*.cu"))}
