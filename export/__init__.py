"""anomaly-edge export toolchain: checkpoints -> model packs. Needs the `export` extra (torch, onnx)."""
