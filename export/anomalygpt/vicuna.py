"""Vicuna (a Hugging Face Llama folder) + AnomalyGPT's LoRA -> one merged GGUF, quantized.

The folder is read as Hugging Face writes it: config.json, tokenizer.model, and the weights as
`pytorch_model.bin`, `model.safetensors`, or shards listed in `*.index.json`. The LoRA on q/k/v/o
is merged into the base weights (W += B @ A * alpha / r, as peft's merge does), the GGUF is
written by `export.llama_gguf` and then quantized with llama.cpp's `llama_model_quantize`.
"""
from __future__ import annotations

import ctypes
import json
import re
from pathlib import Path

import numpy as np

from ..common import ExportError

LORA_TARGETS = ("q", "k", "v", "o")
# peft names: ...layers.N.self_attn.q_proj.lora_A.weight (peft 0.2) or .lora_A.default.weight (0.3+).
_LORA_KEY = re.compile(r"^llama_model\..*?layers\.(\d+)\.self_attn\.([qkvo])_proj\.lora_([AB])(?:\.default)?\.weight$")
# Output types: name -> llama.cpp ftype (None: the F16 GGUF as written, no quantization).
QUANT_TYPES = {"Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "F16": None}


def _numpy(t) -> np.ndarray:
    """A torch tensor as NumPy without copying fp16/fp32 data (bf16, which NumPy lacks, becomes fp32)."""
    import torch

    t = t.detach()  # AnomalyGPT's trainer saves nn.Parameters that require grad
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def load_torch_file(path: Path, what: str) -> dict:
    """A torch-saved state_dict, memory-mapped where the file format allows; errors name the file."""
    import torch

    if not path.is_file():
        raise ExportError(f"{path}: {what} not found")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise ExportError(f"{path}: cannot read {what}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise ExportError(f"{path}: {what} holds a {type(state).__name__}, expected a state_dict")
    # AnomalyGPT's trainer saves the named_parameters() that require grad (nn.Parameter, fp16): plain
    # tensors from here on, so nothing downstream meets autograd.
    return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise ExportError(f"{index}: not a Hugging Face weight index ({e})") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise ExportError(f"{index}: lists {', '.join(missing)}, not found in {folder}")
            return [folder / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise ExportError(f"{folder}: no weights (model.safetensors, pytorch_model.bin or a *.index.json of shards)")


def read_hf_llama(folder: str | Path) -> tuple[dict, dict[str, np.ndarray], Path, list[Path]]:
    """(config, tensors by Hugging Face name, tokenizer.model path, weight files) of a Llama folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: Vicuna folder not found")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{config_path}: missing (a Hugging Face Llama folder has config.json)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise ExportError(f"{config_path}: not valid JSON: {e}") from None
    if config.get("model_type", "llama") != "llama":
        raise ExportError(f"{config_path}: model_type {config.get('model_type')!r}, expected 'llama'")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
               if not isinstance(config.get(k), int)]
    if missing:
        raise ExportError(f"{config_path}: {', '.join(missing)} missing or not integers (a LlamaConfig has them)")
    tokenizer = folder / "tokenizer.model"
    if not tokenizer.is_file():
        raise ExportError(f"{tokenizer}: missing (the SentencePiece vocabulary the GGUF needs)")
    files = _weight_files(folder)
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                from safetensors import safe_open
            except ImportError as e:
                raise ExportError(f"{f}: reading safetensors needs the safetensors package ({e})") from None
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    tensors[k] = _numpy(sf.get_tensor(k))
        else:
            tensors.update({k: _numpy(v) for k, v in load_torch_file(f, "Vicuna weights").items()})
    return config, tensors, tokenizer, files


def lora_pairs(delta: dict, where: str, n_layers: int) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """{(layer, 'q'|'k'|'v'|'o'): (A: r x in, B: out x r)} from the delta checkpoint's peft keys."""
    found: dict[tuple[int, str], dict[str, tuple[str, np.ndarray]]] = {}
    for key, value in delta.items():
        m = _LORA_KEY.match(key)
        if m:
            layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
            if layer >= n_layers:
                raise ExportError(f"{where}: '{key}': layer {layer}, but the Vicuna config has {n_layers} layers")
            found.setdefault((layer, proj), {})[ab] = (key, _numpy(value.float()))
    if not found:
        raise ExportError(f"{where}: no LoRA weights (keys like 'llama_model.base_model.model.model.layers.0."
                          "self_attn.q_proj.lora_A.weight')")
    pairs = {}
    for (layer, proj), ab in sorted(found.items()):
        for half in "AB":
            if half not in ab:
                other = next(iter(ab.values()))[0]
                raise ExportError(f"{where}: '{other}' has no matching lora_{half} weight")
        (ka, a), (kb, b) = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ExportError(f"{where}: '{ka}' {a.shape} and '{kb}' {b.shape} are not a rank-r pair (r x in, out x r)")
        pairs[(layer, proj)] = (a, b)
    missing = [f"layers.{i}.{p}_proj" for i in range(n_layers) for p in LORA_TARGETS if (i, p) not in pairs]
    if missing:
        raise ExportError(f"{where}: LoRA weights missing for {', '.join(missing[:4])}"
                          + (" ..." if len(missing) > 4 else "") + " (AnomalyGPT adapts q, k, v, o of every layer)")
    return pairs


def merge_lora(tensors: dict[str, np.ndarray], pairs: dict, alpha: float) -> tuple[dict[str, np.ndarray], int]:
    """A new tensor dict with W + B @ A * alpha / r for every adapted projection (in float32, then back
    to the base weight's dtype); returns it and r."""
    ranks = {a.shape[0] for a, _ in pairs.values()}
    if len(ranks) != 1:
        raise ExportError(f"LoRA ranks differ between projections: {sorted(ranks)}")
    r = ranks.pop()
    scale = alpha / r
    merged = dict(tensors)
    for (layer, proj), (a, b) in pairs.items():
        name = f"model.layers.{layer}.self_attn.{proj}_proj.weight"
        if name not in tensors:
            raise ExportError(f"Vicuna weights have no '{name}' for the LoRA to merge into")
        w = tensors[name]
        if w.shape != (b.shape[0], a.shape[1]):
            raise ExportError(f"'{name}' is {w.shape} but its LoRA gives {(b.shape[0], a.shape[1])}")
        merged[name] = (w.astype(np.float32) + (b @ a) * np.float32(scale)).astype(w.dtype)
    return merged, r


def quantize_gguf(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """llama.cpp's quantizer (llama-cpp-python, imported only here)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ExportError(f"--quant {quant} needs llama-cpp-python (pip install 'anomaly-edge[llm]'), "
                          f"or pass --quant F16 to skip quantization ({e})") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp could not quantize {src} to {quant} (return code {rc})")
