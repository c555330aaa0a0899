"""Inference stage: frame preprocessing and image I/O, the Backend protocol with its ONNX Runtime and
TensorRT implementations, device choice and the CUDA kernels' loader. Imports only the pack contract."""
