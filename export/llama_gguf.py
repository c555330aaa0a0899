"""Hugging Face Llama weights -> a llama.cpp GGUF (llama architecture), with the gguf library.

    write_llama_gguf(tensors, config, vocab, "model.gguf", dtype="f16")

`tensors` uses LlamaForCausalLM names (`model.embed_tokens.weight`, `model.layers.0.self_attn.q_proj.weight`,
..., `lm_head.weight`); `config` is the checkpoint's config.json as a dict; `vocab` a `LlamaVocab`, from
`sentencepiece_vocab(tokenizer.model)` for a real checkpoint or `tiny_vocab()` for tests. Tensors are
converted and written one at a time, so memory-mapped inputs (np.load(mmap_mode="r"), safetensors'
numpy views) are never all in memory at once.

Hugging Face stores q_proj/k_proj for RoPE applied to the two halves of each head (rotate_half);
llama.cpp rotates interleaved pairs, so their rows are permuted here exactly as llama.cpp's
convert_hf_to_gguf.py does (`LlamaModel.permute`). `tiny_random_llama` writes a small random model for
tests, and tests/test_llm_gguf.py checks the written file against a NumPy Hugging Face forward.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.errors import EdgeError

# Hugging Face LlamaForCausalLM names -> GGUF names ({i}: layer index).
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed by llama.cpp from rope_theta

# SentencePiece token types as GGUF stores them (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class GgufExportError(EdgeError):
    pass


@dataclass
class LlamaVocab:
    """A SentencePiece ("llama") vocabulary: pieces ("▁" marks a leading space), scores, token types."""

    tokens: list[bytes]
    scores: list[float]
    token_types: list[int]
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    pad_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    chat_template: str | None = None
    extra: dict = field(default_factory=dict)  # more tokenizer.ggml.* keys, if ever needed

    def __post_init__(self):
        self.tokens = [t.encode() if isinstance(t, str) else bytes(t) for t in self.tokens]
        n = len(self.tokens)
        if len(self.scores) != n or len(self.token_types) != n:
            raise GgufExportError(f"vocab has {n} tokens but {len(self.scores)} scores and "
                                  f"{len(self.token_types)} token types")
        for name in ("bos_id", "eos_id", "unk_id", "pad_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < n:
                raise GgufExportError(f"vocab {name} {value} is outside 0..{n - 1}")


def sentencepiece_vocab(model_path: str | Path, vocab_size: int | None = None) -> LlamaVocab:
    """The vocabulary of a SentencePiece tokenizer.model, as llama.cpp's converter reads it.

    Tokens from added_tokens.json beside it are added as user-defined; `vocab_size` (the config's)
    pads with unused [PADi] tokens when the embedding matrix has more rows than the tokenizer pieces.
    Needs the `sentencepiece` package."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:
        raise GgufExportError(f"reading {model_path} needs the sentencepiece package "
                              f"(pip install 'anomaly-edge[export]'): {e}") from None
    model_path = Path(model_path)
    if not model_path.is_file():
        raise GgufExportError(f"{model_path}: no SentencePiece tokenizer.model there")
    sp = SentencePieceProcessor()
    if not sp.LoadFromFile(str(model_path)):
        raise GgufExportError(f"{model_path}: not a SentencePiece model")
    n = vocab_size or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(n)]
    scores = [-10000.0] * n
    types = [UNUSED] * n
    for i in range(min(n, sp.vocab_size())):
        tokens[i] = sp.IdToPiece(i).encode()
        scores[i] = sp.GetScore(i)
        types[i] = (UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i) else UNUSED if sp.IsUnused(i)
                    else BYTE if sp.IsByte(i) else NORMAL)
    added = model_path.with_name("added_tokens.json")
    if added.is_file():
        for piece, i in json.loads(added.read_text()).items():
            if i >= n:
                raise GgufExportError(f"{added}: token {piece!r} has id {i}, beyond vocab_size {n}")
            tokens[i], scores[i], types[i] = piece.encode(), -1000.0, USER_DEFINED

    def special(i: int) -> int | None:
        return i if 0 <= i < n else None

    return LlamaVocab(tokens, scores, types, bos_id=special(sp.bos_id()), eos_id=special(sp.eos_id()),
                      unk_id=special(sp.unk_id()), pad_id=special(sp.pad_id()))


def tiny_vocab(words: tuple[str, ...] = ()) -> LlamaVocab:
    """A small byte-fallback SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, ASCII
    characters with and without a leading "▁", and `words` (each with a leading "▁") - any text tokenizes."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    pieces = ["▁"] + [chr(c) for c in range(33, 127)] + ["▁" + chr(c) for c in range(33, 127)]
    pieces += ["▁" + w for w in words if "▁" + w not in pieces]
    tokens += pieces
    types += [NORMAL] * len(pieces)
    # Longer pieces score higher, so the tokenizer prefers whole words to characters.
    scores = [0.0] * (3 + 256) + [float(len(p)) - i * 1e-3 for i, p in enumerate(pieces)]
    return LlamaVocab(tokens, scores, types)


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a Hugging Face q_proj/k_proj (rotate_half RoPE) reordered for llama.cpp's pairwise RoPE."""
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise GgufExportError(f"cannot permute a {weight.shape} projection for {n_head} heads")
    return (weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _gguf_name(hf_name: str, n_layers: int) -> str | None:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    if hf_name.endswith(IGNORED_SUFFIXES):
        return None
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in LAYER_NAMES:
        i = int(parts[2])
        if i >= n_layers:
            raise GgufExportError(f"tensor {hf_name}: layer {i} but num_hidden_layers is {n_layers}")
        return f"blk.{i}.{LAYER_NAMES[parts[3]]}"
    raise GgufExportError(f"tensor {hf_name}: not a LlamaForCausalLM weight this writer knows")


def _hparam(config: dict, key: str):
    if key not in config:
        raise GgufExportError(f"config has no {key!r} (a Hugging Face LlamaConfig needs it)")
    return config[key]


def write_llama_gguf(tensors: dict[str, np.ndarray], config: dict, vocab: LlamaVocab, out_path: str | Path,
                     dtype: str = "f32", name: str = "llama") -> Path:
    """Write a llama-architecture GGUF from Hugging Face LlamaForCausalLM tensors and config.

    `dtype` f16 stores the matrices in half precision (norms stay f32, as llama.cpp expects). Without
    `lm_head.weight` (tie_word_embeddings) llama.cpp uses the token embeddings as output."""
    import gguf

    if dtype not in ("f32", "f16"):
        raise GgufExportError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    n_layers = int(_hparam(config, "num_hidden_layers"))
    n_embd = int(_hparam(config, "hidden_size"))
    n_head = int(_hparam(config, "num_attention_heads"))
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    n_vocab = int(config.get("vocab_size") or len(vocab.tokens))
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    if len(vocab.tokens) != n_vocab:
        raise GgufExportError(f"vocab has {len(vocab.tokens)} tokens but config vocab_size is {n_vocab}")
    if (rope := config.get("rope_scaling")) and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise GgufExportError(f"rope_scaling {rope} is not supported by this writer (plain RoPE only)")

    plan = []  # (gguf name, hf name, rows permuted for n heads or None, target dtype)
    for hf_name in tensors:
        gname = _gguf_name(hf_name, n_layers)
        if gname is None:
            continue
        heads = (n_head if hf_name.endswith("q_proj.weight") else
                 n_head_kv if hf_name.endswith("k_proj.weight") else None)
        target = np.float16 if dtype == "f16" and tensors[hf_name].ndim > 1 else np.float32
        plan.append((gname, hf_name, heads, target))
    have = {p[0] for p in plan}
    needed = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{v}" for i in range(n_layers) for v in LAYER_NAMES.values()]
    missing = [n for n in needed if n not in have]
    if missing:
        raise GgufExportError(f"missing tensors for a {n_layers}-layer Llama: {', '.join(missing[:6])}"
                              + (" ..." if len(missing) > 6 else ""))
    embd = tensors["model.embed_tokens.weight"]
    if tuple(embd.shape) != (n_vocab, n_embd):
        raise GgufExportError(f"model.embed_tokens.weight is {tuple(embd.shape)}, config says ({n_vocab}, {n_embd})")

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    w = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        w.add_name(name)
        w.add_context_length(int(config.get("max_position_embeddings", 2048)))
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(int(_hparam(config, "intermediate_size")))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        w.add_vocab_size(n_vocab)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        _add_vocab(w, vocab)
        for gname, hf_name, _, target in plan:
            shape = tuple(tensors[hf_name].shape)
            w.add_tensor_info(gname, shape, np.dtype(target), int(np.prod(shape)) * np.dtype(target).itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, hf_name, heads, target in plan:
            data = np.asarray(tensors[hf_name], dtype=np.float32)
            if heads is not None:
                data = permute_rotary(data, heads)
            w.write_tensor_data(np.ascontiguousarray(data, dtype=target))
        w.close()
        tmp.replace(out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def _add_vocab(w, vocab: LlamaVocab) -> None:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.token_types)
    for add, value in ((w.add_bos_token_id, vocab.bos_id), (w.add_eos_token_id, vocab.eos_id),
                       (w.add_unk_token_id, vocab.unk_id), (w.add_pad_token_id, vocab.pad_id)):
        if value is not None:
            add(value)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
    for key, value in vocab.extra.items():
        w.add_key_value(key, value, _value_type(value))


def _value_type(value):
    import gguf

    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.INT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    return gguf.GGUFValueType.STRING


TINY_WORDS = ("Human", "Assistant", "Img", "###", "Is", "there", "an", "anomaly", "in", "the", "image", "Yes",
              "No", "scratch", "part")


def tiny_random_llama(out_path: str | Path, seed: int = 0, n_layers: int = 2, hidden: int = 64, n_heads: int = 4,
                      n_kv_heads: int = 2, intermediate: int = 128, context: int = 512, dtype: str = "f32",
                      scale: float = 0.08, vocab: LlamaVocab | None = None
                      ) -> tuple[Path, dict[str, np.ndarray], dict, LlamaVocab]:
    """A small random Llama (grouped-query attention, untied output) written as GGUF for tests, with
    `tiny_vocab()` or the given vocabulary.

    Returns (path, Hugging Face tensors, config, vocab): the tensors are what a reference forward needs,
    `model.embed_tokens.weight` rows are what the token path looks up."""
    vocab = vocab or tiny_vocab(TINY_WORDS)
    n_vocab = len(vocab.tokens)
    head_dim = hidden // n_heads
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
              "vocab_size": n_vocab, "max_position_embeddings": context, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False}
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors = {"model.embed_tokens.weight": rand(n_vocab, hidden) * 10,
               "model.norm.weight": (1 + rand(hidden)).astype(np.float32),
               "lm_head.weight": rand(n_vocab, hidden)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": (1 + rand(hidden)).astype(np.float32),
            p + "self_attn.q_proj.weight": rand(n_heads * head_dim, hidden) * 4,
            p + "self_attn.k_proj.weight": rand(n_kv_heads * head_dim, hidden) * 4,
            p + "self_attn.v_proj.weight": rand(n_kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, n_heads * head_dim),
            p + "post_attention_layernorm.weight": (1 + rand(hidden)).astype(np.float32),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
        })
    path = write_llama_gguf(tensors, config, vocab, out_path, dtype=dtype, name="tiny-random-llama")
    return path, tensors, config, vocab
