"""A NumPy Hugging Face LlamaForCausalLM forward: the reference the GGUF writer is checked against."""
import numpy as np


def hf_llama_forward(tensors: dict, config: dict, ids: list[int]) -> np.ndarray:
    """Logits (len(ids) x vocab) of LlamaForCausalLM with eager attention and rotate_half RoPE, in float64."""
    t = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    d = config["hidden_size"] // n_head
    eps = config["rms_norm_eps"]
    n = len(ids)

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    inv = 1.0 / config["rope_theta"] ** (np.arange(0, d, 2) / d)
    ang = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # n x heads x d; Hugging Face rotates the two halves of each head
        half = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos[:, None] + half * sin[:, None]

    h = t["model.embed_tokens.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, t[p + "input_layernorm.weight"])
        q = rope((x @ t[p + "self_attn.q_proj.weight"].T).reshape(n, n_head, d))
        k = rope((x @ t[p + "self_attn.k_proj.weight"].T).reshape(n, n_kv, d))
        v = (x @ t[p + "self_attn.v_proj.weight"].T).reshape(n, n_kv, d)
        k, v = np.repeat(k, n_head // n_kv, 1), np.repeat(v, n_head // n_kv, 1)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + mask
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", a, v).reshape(n, n_head * d)
        h = h + o @ t[p + "self_attn.o_proj.weight"].T
        x = rms(h, t[p + "post_attention_layernorm.weight"])
        g = x @ t[p + "mlp.gate_proj.weight"].T
        h = h + ((g / (1 + np.exp(-g))) * (x @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    return rms(h, t["model.norm.weight"]) @ t["lm_head.weight"].T
