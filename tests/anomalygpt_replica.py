"""Tiny random replicas of AnomalyGPT's three inputs, laid out as the real files are.

The key names and shapes are written out here from ImageBind's and AnomalyGPT's source (not taken
from the exporter's modules), so a naming mistake in the exporter fails to load them:
- imagebind_huge.pth: the full ImageBind state_dict (every modality; a few audio keys stand for the
  ones the exporter does not read);
- pytorch_model.pt: AnomalyGPT's trainable parameters (decoder, prompt learner, llama_proj, peft LoRA);
- a Vicuna v0 style Hugging Face folder: config.json, two .bin shards with their index,
  tokenizer.model (a SentencePiece model trained here) and added_tokens.json ([PAD], as Vicuna v0).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

VISION_WIDTH, VISION_BLOCKS = 32, 4
TEXT_WIDTH, TEXT_BLOCKS = 32, 2
EMBED_DIM = 24
CLIP_VOCAB, CONTEXT = 49408, 77
N_EMBD, N_LAYERS, N_HEADS, FFN = 64, 2, 4, 128
LORA_R = 4
SP_WORDS = ("Human Assistant Img image anomaly there is a an the in of photo part scratch hole crack bottle "
            "screw yes no describe defect surface metal normal broken damaged flaw").split()


def _block(prefix: str, w: int) -> dict[str, tuple]:
    return {prefix + "attn.in_proj_weight": (3 * w, w), prefix + "attn.in_proj_bias": (3 * w,),
            prefix + "attn.out_proj.weight": (w, w), prefix + "attn.out_proj.bias": (w,),
            prefix + "norm_1.weight": (w,), prefix + "norm_1.bias": (w,),
            prefix + "mlp.fc1.weight": (4 * w, w), prefix + "mlp.fc1.bias": (4 * w,),
            prefix + "mlp.fc2.weight": (w, 4 * w), prefix + "mlp.fc2.bias": (w,),
            prefix + "norm_2.weight": (w,), prefix + "norm_2.bias": (w,)}


def imagebind_shapes(vw=VISION_WIDTH, vb=VISION_BLOCKS, tw=TEXT_WIDTH, tb=TEXT_BLOCKS, out=EMBED_DIM) -> dict:
    s = {"modality_preprocessors.vision.cls_token": (1, 1, vw),
         "modality_preprocessors.vision.rgbt_stem.proj.1.weight": (vw, 3, 2, 14, 14),
         "modality_preprocessors.vision.pos_embedding_helper.pos_embed": (1, 257, vw),
         "modality_preprocessors.text.pos_embed": (1, CONTEXT, tw),
         "modality_preprocessors.text.mask": (CONTEXT, CONTEXT),
         "modality_preprocessors.text.token_embedding.weight": (CLIP_VOCAB, tw),
         "modality_trunks.vision.pre_transformer_layer.0.weight": (vw,),
         "modality_trunks.vision.pre_transformer_layer.0.bias": (vw,),
         "modality_heads.vision.0.weight": (vw,), "modality_heads.vision.0.bias": (vw,),
         "modality_heads.vision.2.weight": (out, vw),
         "modality_heads.text.proj.0.weight": (tw,), "modality_heads.text.proj.0.bias": (tw,),
         "modality_heads.text.proj.1.weight": (out, tw),
         "modality_postprocessors.text.1.log_logit_scale": (),
         # Other modalities: present in the real file, not read by the exporter.
         "modality_preprocessors.audio.cls_token": (1, 1, 8),
         "modality_trunks.audio.blocks.0.attn.bias_k": (1, 1, 8),
         "modality_postprocessors.audio.1.log_logit_scale": ()}
    for i in range(vb):
        s.update(_block(f"modality_trunks.vision.blocks.{i}.", vw))
    for i in range(tb):
        s.update(_block(f"modality_trunks.text.blocks.{i}.", tw))
    return s


def write_imagebind(path: Path, seed: int = 0, **sizes) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in imagebind_shapes(**sizes).items():
        if key.endswith("text.mask"):
            state[key] = torch.full(shape, float("-inf")).triu_(1)
        elif key.endswith("log_logit_scale"):
            state[key] = torch.tensor(float(np.log(1 / 0.07)))
        elif len(shape) == 1 and key.endswith("weight"):  # LayerNorm gains
            state[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            scale = 0.02 if "embedding" in key or "rgbt" in key else 0.2 if len(shape) < 2 else shape[-1] ** -0.5
            state[key] = torch.randn(shape, generator=g) * scale
    torch.save(state, path)
    return state


def delta_shapes(width=VISION_WIDTH, embed=EMBED_DIM, n_embd=N_EMBD, n_layers=N_LAYERS, r=LORA_R,
                 lora_suffix=".default") -> dict:
    s = {}
    for i in range(4):
        s[f"image_decoder.fc.{i}.weight"] = (embed, width)
        s[f"image_decoder.fc.{i}.bias"] = (embed,)
    widths = [1, 4, 16, 64, 256, 1024]
    for j, (a, b) in enumerate(zip(widths, widths[1:])):
        s[f"prompt_learner.meta_net.{3 * j}.weight"] = (b, a, 3, 3)
        s[f"prompt_learner.meta_net.{3 * j}.bias"] = (b,)
    s["prompt_learner.meta_net.15.weight"] = (n_embd, 1024, 5, 5)
    s["prompt_learner.meta_net.15.bias"] = (n_embd,)
    s["prompt_learner.base_prompts"] = (9, n_embd)
    s["llama_proj.weight"] = (n_embd, embed)
    s["llama_proj.bias"] = (n_embd,)
    for i in range(n_layers):
        for p in "qkvo":
            base = f"llama_model.base_model.model.model.layers.{i}.self_attn.{p}_proj."
            s[base + f"lora_A{lora_suffix}.weight"] = (r, n_embd)
            s[base + f"lora_B{lora_suffix}.weight"] = (n_embd, r)
    return s


def write_delta(path: Path, seed: int = 1, drop: tuple[str, ...] = (), saved_as: str = "trainer", **sizes) -> dict:
    """A random delta checkpoint. saved_as "trainer": as AnomalyGPT's trainer writes it, an OrderedDict of
    the model's named_parameters() that require grad, in fp16 (nn.Parameter values); "tensors": plain
    float32 tensors. Returns the values as float32 tensors."""
    from collections import OrderedDict

    if saved_as not in ("trainer", "tensors"):
        raise ValueError(f"saved_as must be 'trainer' or 'tensors', got {saved_as!r}")
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in delta_shapes(**sizes).items():
        if key in drop:
            continue
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = fan_in ** -0.5 if len(shape) > 1 else 0.1
        if ".lora_B" in key:
            scale *= 0.1  # an adapter nudges the base weights (alpha/r = 8 here), it does not replace them
        state[key] = torch.randn(shape, generator=g) * scale
    if saved_as == "trainer":
        params = OrderedDict((k, torch.nn.Parameter(v.half(), requires_grad=True)) for k, v in state.items())
        torch.save(params, path)
        return {k: v.detach().float() for k, v in params.items()}
    torch.save(state, path)
    return state


def train_sentencepiece(folder: Path) -> Path:
    import sentencepiece as spm

    text = folder / "corpus.txt"
    rng = np.random.default_rng(0)
    text.write_text("\n".join(" ".join(rng.choice(SP_WORDS, 12)) + " ### </Img> <Img> ?." for _ in range(400)))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    text.unlink()
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


def write_vicuna(folder: Path, seed: int = 2) -> tuple[dict, dict[str, np.ndarray]]:
    """A Vicuna v0 style folder: the SentencePiece pieces plus [PAD] (added_tokens.json), no GQA,
    weights in two pytorch_model-0000N-of-00002.bin shards. Returns (config, tensors)."""
    import sentencepiece as spm

    from export.llama_gguf import sentencepiece_vocab, tiny_random_llama

    folder.mkdir(parents=True, exist_ok=True)
    model = train_sentencepiece(folder)
    n_pieces = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()
    (folder / "added_tokens.json").write_text(json.dumps({"[PAD]": n_pieces}))
    vocab = sentencepiece_vocab(model, n_pieces + 1)
    _, tensors, config, _ = tiny_random_llama(folder / "scratch.gguf", seed=seed, n_layers=N_LAYERS, hidden=N_EMBD,
                                              n_heads=N_HEADS, n_kv_heads=N_HEADS, intermediate=FFN, vocab=vocab)
    (folder / "scratch.gguf").unlink()
    config = {k: v for k, v in config.items() if k != "num_key_value_heads"} | {"model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
    weight_map = {}
    for shard, keys in shards.items():
        torch.save({k: torch.from_numpy(tensors[k]).half() for k in keys}, folder / shard)
        weight_map.update({k: shard for k in keys})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return config, {k: v.astype(np.float16) for k, v in tensors.items()}


def write_all(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    write_imagebind(root / "imagebind_huge.pth")
    write_delta(root / "pytorch_model.pt")
    write_vicuna(root / "vicuna")
    return {"imagebind": root / "imagebind_huge.pth", "delta": root / "pytorch_model.pt", "vicuna": root / "vicuna"}
