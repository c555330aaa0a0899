"""`anomaly-edge export anomalygpt`: the pack from ImageBind-H, AnomalyGPT's delta and Vicuna-7B v0.

    vision.onnx      image -> zero-shot anomaly map per class, image embedding, tapped patch tokens
    projector.onnx   image embedding -> 1 LLM embedding; anomaly map -> 18 prompt embeddings
    llm.gguf         Vicuna with AnomalyGPT's LoRA merged, quantized
    vision.plan      TensorRT engine of vision.onnx, where TensorRT exists
    pack.yaml

Every input is checked (files, keys, shapes, class names) before the slow steps; each ONNX file is
compared with the PyTorch forward it came from; the pack folder appears only when all succeeded.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from pathlib import Path

import numpy as np

from edge.scoring.anomalygpt import PROJECTOR_INPUTS, PROJECTOR_OUTPUTS, VISION_EMBEDDING, VISION_MAPS, VISION_TOKENS
from edge.pack import (SCHEMA_VERSION, ConversationSpec, EncoderSpec, FeatureLayer, FileEntry, InputSpec, LlmSpec,
                       Normalization, PackManifest, ScorerSpec, ZeroShotSpec, sha256_file)

from .. import assets
from ..common import ExportError, build_pack, export_onnx, note, onnx_max_abs_error, prepare_out, step
from ..llama_gguf import GgufExportError, sentencepiece_vocab, write_llama_gguf
from ..tensorrt import build_engine
from . import model as agpt
from .clip_tokenizer import ClipTokenizer
from .imagebind import load_imagebind
from .vicuna import QUANT_TYPES, load_torch_file, lora_pairs, merge_lora, quantize_gguf, read_hf_llama

# ImageBind's (CLIP's) normalization, for pixel values in 0..1.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ABS_ERROR = 1e-4
LORA_ALPHA = 32.0  # code/config/openllama_peft.yaml (lora_r 32, lora_alpha 32)
MAX_BANK_PATCHES = 4096  # 16 reference views of 16 x 16 patches; each holds 4 x 1280 floats
ONNX_SINGLE_FILE_LIMIT = 2 ** 31 - 2 ** 26  # protobuf's 2 GB cap, with room for the graph itself
_CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _-]*$")


def parse_classes(text: str) -> list[str]:
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if not classes:
        raise ExportError(f"--classes {text!r}: give at least one class name, e.g. bottle,screw")
    for c in classes:
        if not _CLASS_NAME.match(c):
            raise ExportError(f"--classes: {c!r} is not a class name (ASCII letters, digits, spaces, '_' or '-')")
    if len(set(classes)) != len(classes):
        raise ExportError(f"--classes: {text!r} names a class twice")
    return classes


def _checked(load, *args):
    """Run a checkpoint loader, turning its KeyError/ValueError (which name the file and key) into ExportError."""
    try:
        return load(*args)
    except (KeyError, ValueError) as e:
        raise ExportError(e.args[0] if e.args else str(e)) from None


def _probe_images(size: int, seed: int) -> np.ndarray:
    """Noise over the normalized range and a smooth, image-like texture."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    texture = cv2.GaussianBlur(rng.standard_normal((size, size, 3)).astype(np.float32), (0, 0), 4) * 8
    return np.concatenate([noise, texture.transpose(2, 0, 1)[None]])


def _check(model, path: Path, feeds: dict, names: list[str]) -> dict[str, float]:
    t = time.perf_counter()
    errors = onnx_max_abs_error(model, path, feeds, names)
    worst = max(errors.values())
    note("max abs error vs PyTorch: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
         + f" (limit {MAX_ABS_ERROR:.0e}, {time.perf_counter() - t:.1f} s)")
    if not worst <= MAX_ABS_ERROR:
        raise ExportError(f"{path.name}: ONNX Runtime differs from PyTorch by {worst:.2e} > {MAX_ABS_ERROR:.0e}")
    return errors


def _export_and_consolidate(model, args: tuple, dst: Path, inputs: list[str], outputs: list[str],
                            single_file_limit: int) -> list[Path]:
    """Export to ONNX; weights over the single-file limit go to one `<name>.data` file beside it
    (the exporter alone would write one file per tensor). Returns the files written."""
    import onnx

    raw_dir = dst.parent / f".{dst.stem}-raw"
    raw_dir.mkdir()
    try:
        export_onnx(model, args, raw_dir / dst.name, inputs, outputs)
        proto = onnx.load(str(raw_dir / dst.name))
        size = sum(t.ByteSize() for t in proto.graph.initializer)
        # The graph file names its weights' digest, so its sha256 (the pack's encoder identity, which
        # station states are checked against) changes with the weights even when they live in .data.
        digest = hashlib.sha256()
        for t in proto.graph.initializer:
            digest.update(t.SerializeToString())
        onnx.helper.set_model_props(proto, {"weights_sha256": digest.hexdigest()})
        if size > single_file_limit:
            onnx.save_model(proto, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=dst.name + ".data", size_threshold=1024)
            files = [dst, dst.with_name(dst.name + ".data")]
        else:
            onnx.save_model(proto, str(dst))
            files = [dst]
    finally:
        for f in raw_dir.iterdir():
            f.unlink()
        raw_dir.rmdir()
    note(f"{dst.name}: {sum(f.stat().st_size for f in files) / 1e6:.1f} MB in {len(files)} file(s)")
    return files


def _file_entries(key: str, files: list[Path]) -> dict[str, FileEntry]:
    entries = {key: FileEntry(path=files[0].name, sha256=sha256_file(files[0]))}
    for extra in files[1:]:
        entries[f"{key}_data"] = FileEntry(path=extra.name, sha256=sha256_file(extra))
    return entries


def export_anomalygpt(out: str | Path, imagebind: str | Path, delta: str | Path | list, vicuna: str | Path,
                      classes: list[str] | str, quant: str = "Q4_K_M", lora_alpha: float = LORA_ALPHA,
                      bpe: str | Path | None = None, force: bool = False,
                      onnx_single_file_limit: int = ONNX_SINGLE_FILE_LIMIT) -> Path:
    """`delta`: AnomalyGPT's pytorch_model.pt, or several delta files loaded in order, later keys
    replacing earlier ones (as AnomalyGPT's test scripts load PandaGPT's delta, then AnomalyGPT's)."""
    import torch

    deltas = [Path(d) for d in (delta if isinstance(delta, (list, tuple)) else [delta])]
    out, imagebind, vicuna = Path(out), Path(imagebind), Path(vicuna)
    prepare_out(out, force)
    classes = parse_classes(classes if isinstance(classes, str) else ",".join(classes))
    if quant not in QUANT_TYPES:
        raise ExportError(f"--quant {quant!r}: choose one of {', '.join(QUANT_TYPES)}")
    if not lora_alpha > 0:
        raise ExportError(f"--lora-alpha must be > 0, got {lora_alpha}")
    if not deltas:
        raise ExportError("no AnomalyGPT delta checkpoint given")
    for path, what in ((imagebind, "ImageBind checkpoint"), *((d, "AnomalyGPT delta checkpoint") for d in deltas)):
        if not path.is_file():
            raise ExportError(f"{path}: {what} not found")
    n = 10

    step(1, n, "reading Vicuna's config, tokenizer.model and weights index")
    llama_config, llama_tensors, tokenizer_model, weight_files = read_hf_llama(vicuna)
    n_embd, n_layers = int(llama_config["hidden_size"]), int(llama_config["num_hidden_layers"])
    try:
        vocab = sentencepiece_vocab(tokenizer_model, int(llama_config.get("vocab_size") or 0) or None)
    except GgufExportError as e:
        raise ExportError(str(e)) from None
    note(f"Llama {n_layers} layers x {n_embd}, vocabulary {len(vocab.tokens)} tokens, {len(weight_files)} weight file(s)")

    step(2, n, "CLIP BPE vocabulary for ImageBind's text tower (pinned sha256)")
    bpe_path = assets.fetch(assets.CLIP_BPE, log=note) if bpe is None else \
        assets.verify_file(Path(bpe), assets.CLIP_BPE.member_sha256)

    step(3, n, f"loading ImageBind's vision and text towers from {imagebind.name}")
    ib = _checked(load_imagebind, load_torch_file(imagebind, "ImageBind checkpoint"), str(imagebind))
    cfg = ib.cfg
    taps = cfg.default_taps()
    note(f"vision {cfg.vision_blocks} blocks x {cfg.vision_width}, taps {list(taps)}; text {cfg.text_blocks} blocks "
         f"x {cfg.text_width}; embedding {cfg.embed_dim}; {cfg.image_size}px, patch {cfg.patch}")

    where = " + ".join(map(str, deltas))
    step(4, n, f"loading AnomalyGPT's decoder, prompt learner, llama_proj and LoRA from {where}")
    delta_state = {}
    for d in deltas:
        delta_state.update(load_torch_file(d, "AnomalyGPT delta checkpoint"))
    heads = _checked(agpt.load_heads, delta_state, where, cfg.vision_width, cfg.embed_dim, n_embd, len(taps))
    pairs = lora_pairs(delta_state, where, n_layers)
    del delta_state

    step(5, n, f"text features of {len(classes)} class(es) through ImageBind's text tower (prompt ensemble)")
    text = agpt.class_text_features(ib, ClipTokenizer(bpe_path, cfg.context_length), classes)

    def build(tmp: Path) -> PackManifest:
        size = cfg.image_size
        t = step(6, n, f"exporting vision.onnx ({size}x{size}, dynamic batch) and checking it")
        vision = agpt.VisionGraph(ib, heads.image_decoder, text, taps).eval()
        vision_files = _export_and_consolidate(vision, (torch.zeros(2, 3, size, size),), tmp / "vision.onnx",
                                               ["image"], [VISION_MAPS, VISION_EMBEDDING, VISION_TOKENS],
                                               onnx_single_file_limit)
        vision_err = _check(vision, vision_files[0], {"image": _probe_images(size, 0)},
                            [VISION_MAPS, VISION_EMBEDDING, VISION_TOKENS])
        note(f"{time.perf_counter() - t:.1f} s")

        step(7, n, "exporting projector.onnx (llama_proj, prompt learner) and checking it")
        projector = agpt.ProjectorGraph(heads).eval()
        rng = np.random.default_rng(1)
        emb = rng.standard_normal((3, cfg.embed_dim)).astype(np.float32)
        feeds = {PROJECTOR_INPUTS[0]: emb / np.linalg.norm(emb, axis=1, keepdims=True),
                 PROJECTOR_INPUTS[1]: rng.uniform(0, 1, (3, 1, size, size)).astype(np.float32)}
        projector_files = _export_and_consolidate(
            projector, tuple(torch.from_numpy(v[:2]) for v in feeds.values()), tmp / "projector.onnx",
            PROJECTOR_INPUTS, PROJECTOR_OUTPUTS, onnx_single_file_limit)
        projector_err = _check(projector, projector_files[0], feeds, PROJECTOR_OUTPUTS)

        t = step(8, n, f"merging the LoRA (alpha {lora_alpha:g}) into Vicuna and writing the GGUF")
        merged, rank = merge_lora(llama_tensors, pairs, lora_alpha)
        note(f"rank {rank}, scale alpha/r = {lora_alpha / rank:g}, {len(pairs)} projections merged")
        llm = tmp / "llm.gguf"
        f16 = llm if quant == "F16" else tmp / "llm-f16.gguf"
        try:
            write_llama_gguf(merged, llama_config, vocab, f16, dtype="f16", name=f"{vicuna.name}+anomalygpt-lora")
        except GgufExportError as e:
            raise ExportError(f"{vicuna}: {e}") from None
        del merged
        note(f"{f16.name}: {f16.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s")

        t = step(9, n, f"quantizing the GGUF to {quant}" if quant != "F16" else "quantizing: skipped (--quant F16)")
        if quant != "F16":
            quantize_gguf(f16, llm, quant)
            f16.unlink()
            note(f"{llm.name}: {llm.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - t:.1f} s")

        step(10, n, "TensorRT engine for vision.onnx")
        engine = tmp / "vision.plan"
        trt = build_engine(vision_files[0], engine, {"image": (3, size, size)})
        note(f"skipped: {trt['skipped']}" if "skipped" in trt else f"{engine.name} built with {trt['built_with']}")

        files = {**_file_entries("vision", vision_files), **_file_entries("projector", projector_files),
                 "llm": FileEntry(path=llm.name, sha256=sha256_file(llm))}
        if engine.is_file():
            files["vision_engine"] = FileEntry(path=engine.name, sha256=sha256_file(engine))
            trt["file"] = "vision_engine"
        note("sha256 of the pack files and of every input checkpoint file (provenance)")
        g = cfg.grid
        manifest = PackManifest(
            schema_version=SCHEMA_VERSION,
            model_id=f"anomalygpt-vit{cfg.vision_width}x{cfg.vision_blocks}-llama{n_layers}x{n_embd}-{quant.lower()}",
            description=f"AnomalyGPT: ImageBind vision tower with the matching decoder (zero-shot maps for "
                        f"{', '.join(classes)}), few-shot memory bank on layers {list(taps)}, Vicuna+LoRA ({quant})",
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            input=InputSpec(height=size, width=size, colour="rgb", channels=3,
                            normalization=Normalization(mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD])),
            files=files,
            encoder=EncoderSpec(file="vision", output=VISION_TOKENS, feature_shape=(len(taps) * cfg.vision_width, g, g),
                                stride=cfg.patch, aggregation="l2_normalized_per_layer",
                                layers=[FeatureLayer(name=f"modality_trunks.vision.blocks.{i}", stride=cfg.patch,
                                                     channels=cfg.vision_width) for i in taps]),
            scorer=ScorerSpec(kind="anomalygpt", metric="cosine", bank_groups=len(taps),
                              upsample="linear_align_corners", smoothing_sigma=0.0, top_fraction=1.0 / (size * size),
                              max_bank_patches=MAX_BANK_PATCHES, projection_dim=None,
                              zero_shot=ZeroShotSpec(output=VISION_MAPS, classes=classes,
                                                     embedding_output=VISION_EMBEDDING, embedding_dim=cfg.embed_dim)),
            llm=LlmSpec(kind="anomalygpt", file="llm", projector="projector", n_embd=n_embd,
                        context_length=int(llama_config.get("max_position_embeddings", 2048)),
                        n_prompt_embeddings=agpt.N_BASE_PROMPTS + agpt.N_MAP_PROMPTS, conversation=ConversationSpec()),
            provenance={
                "exporter": "anomaly-edge export anomalygpt",
                "imagebind": {"file": imagebind.name, "sha256": sha256_file(imagebind), "vision_blocks": cfg.vision_blocks,
                              "vision_width": cfg.vision_width, "taps": list(taps)},
                "delta": [{"file": d.name, "sha256": sha256_file(d)} for d in deltas],
                "vicuna": {"folder": vicuna.name, "files": {f.name: sha256_file(f) for f in
                                                            [vicuna / "config.json", tokenizer_model, *weight_files]}},
                "lora": {"rank": rank, "alpha": lora_alpha, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                "quantization": quant,
                "text_prompts": {"normal": agpt.NORMAL_STATES, "abnormal": agpt.ABNORMAL_STATES,
                                 "templates": agpt.TEMPLATES},
                "clip_bpe_sha256": assets.CLIP_BPE.member_sha256,
                "export_max_abs_error": {**vision_err, **projector_err},
                "tensorrt": trt,
            },
        )
        return manifest

    build_pack(out, build)
    return out
