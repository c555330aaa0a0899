"""AnomalyGPT's own modules (key names of its delta checkpoint) and the two graphs the pack exports.

- `image_decoder.fc.{0..3}`: one Linear per tapped ImageBind layer, patch tokens -> joint embedding.
- `prompt_learner`: a small CNN (`meta_net.{0,3,...,15}`) turning the 224 x 224 anomaly map into 9
  embeddings of the LLM's width, after 9 learned `base_prompts`.
- `llama_proj`: Linear from ImageBind's image embedding to one LLM input embedding.

`VisionGraph` is vision.onnx: image -> zero-shot anomaly map per class (the decoder's patch
embeddings against the class's normal/abnormal text features, as AnomalyGPT computes it), the image
embedding, and the tapped layers' patch tokens for the few-shot branch. `ProjectorGraph` is
projector.onnx.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .imagebind import ImageBind

# AnomalyGPT's prompt ensemble (code/model/openllama.py): states x templates, averaged per class.
NORMAL_STATES = ["{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage"]
ABNORMAL_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
TEMPLATES = ["a photo of a {}.", "a photo of the {}."]
N_BASE_PROMPTS = 9
N_MAP_PROMPTS = 9  # the prompt learner's 3 x 3 output grid
MAP_LOGIT_SCALE = 100.0


def prompt_sentences(class_name: str) -> tuple[list[str], list[str]]:
    """The normal and abnormal sentences for one class; '_' reads as a space, as in AnomalyGPT."""
    obj = class_name.replace("_", " ")
    return tuple([t.format(s.format(obj)) for s in states for t in TEMPLATES]
                 for states in (NORMAL_STATES, ABNORMAL_STATES))


class ImageDecoder(nn.Module):
    def __init__(self, width: int, embed_dim: int, n_layers: int = 4):
        super().__init__()
        self.fc = nn.ModuleList([nn.Linear(width, embed_dim) for _ in range(n_layers)])


class PromptLearner(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        widths = [1, 4, 16, 64, 256, 1024]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        layers.append(nn.Conv2d(widths[-1], n_embd, 5))
        self.meta_net = nn.Sequential(*layers)
        self.base_prompts = nn.Parameter(torch.zeros(N_BASE_PROMPTS, n_embd))

    def forward(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """N x 1 x 224 x 224 -> N x 18 x n_embd: the learned prompts, then the map's 3 x 3 grid row by row."""
        n = anomaly_map.shape[0]
        grid = self.meta_net(anomaly_map).flatten(2).transpose(1, 2)
        return torch.cat([self.base_prompts.expand(n, -1, -1), grid], dim=1)


class AnomalyGptHeads(nn.Module):
    """The delta checkpoint's non-LLM parameters under their own names."""

    def __init__(self, width: int, embed_dim: int, n_embd: int, n_layers: int = 4):
        super().__init__()
        self.image_decoder = ImageDecoder(width, embed_dim, n_layers)
        self.prompt_learner = PromptLearner(n_embd)
        self.llama_proj = nn.Linear(embed_dim, n_embd)


def class_text_features(imagebind: ImageBind, tokenize, classes: list[str]) -> torch.Tensor:
    """K x 2 x embed_dim: per class, the mean of its normal and of its abnormal sentence embeddings,
    each re-normalized (AnomalyGPT's encode_text_with_prompt_ensemble)."""
    feats = []
    with torch.no_grad():
        for name in classes:
            pair = []
            for sentences in prompt_sentences(name):
                e = imagebind.encode_text(torch.from_numpy(tokenize(sentences))).mean(dim=0)
                pair.append(e / e.norm())
            feats.append(torch.stack(pair))
    return torch.stack(feats)


class VisionGraph(nn.Module):
    def __init__(self, imagebind: ImageBind, decoder: ImageDecoder, text_features: torch.Tensor, taps: tuple[int, ...]):
        super().__init__()
        self.imagebind = imagebind
        self.decoder = decoder
        self.register_buffer("text_features", text_features.float())  # K x 2 x D
        self.taps = tuple(taps)
        self.size = imagebind.cfg.image_size

    def forward(self, image: torch.Tensor):
        embedding, tapped = self.imagebind.encode_image(image, self.taps)
        n = image.shape[0]
        g = self.imagebind.cfg.grid
        k = self.text_features.shape[0]
        text = self.text_features.reshape(2 * k, -1)
        maps = []
        tokens = []
        for fc, layer in zip(self.decoder.fc, tapped):
            patches = layer[:, 1:]  # the CLS token does not take part
            tokens.append(F.normalize(patches, dim=-1).transpose(1, 2).reshape(n, -1, g, g))
            emb = F.normalize(fc(patches), dim=-1)
            logits = (MAP_LOGIT_SCALE * emb @ text.T).transpose(1, 2).reshape(n, 2 * k, g, g)
            logits = F.interpolate(logits, size=(self.size, self.size), mode="bilinear", align_corners=True)
            maps.append(logits.reshape(n, k, 2, self.size, self.size).softmax(dim=2)[:, :, 1])
        anomaly_maps = torch.stack(maps).mean(dim=0)
        return anomaly_maps, embedding, torch.cat(tokens, dim=1)


class ProjectorGraph(nn.Module):
    def __init__(self, heads: AnomalyGptHeads):
        super().__init__()
        self.llama_proj = heads.llama_proj
        self.prompt_learner = heads.prompt_learner

    def forward(self, image_embedding: torch.Tensor, anomaly_map: torch.Tensor):
        return self.llama_proj(image_embedding).unsqueeze(1), self.prompt_learner(anomaly_map)


HEAD_PREFIXES = ("image_decoder.", "prompt_learner.", "llama_proj.")


def load_heads(delta: dict, where: str, width: int, embed_dim: int, n_embd: int, n_layers: int = 4) -> AnomalyGptHeads:
    """The decoder, prompt learner and llama_proj from the delta checkpoint; a missing or misshaped key is named."""
    heads = AnomalyGptHeads(width, embed_dim, n_embd, n_layers)
    own = heads.state_dict()
    for key, want in own.items():
        if key not in delta:
            raise KeyError(f"{where}: key '{key}' is missing (an AnomalyGPT delta checkpoint has "
                           f"{', '.join(p + '*' for p in HEAD_PREFIXES)})")
        got = tuple(delta[key].shape)
        if got != tuple(want.shape):
            raise ValueError(f"{where}: '{key}' has shape {got}, expected {tuple(want.shape)} "
                             f"(ImageBind width {width}, embedding {embed_dim}, LLM width {n_embd})")
    extra = sorted(k for k in delta if k.startswith(HEAD_PREFIXES) and k not in own)
    if extra:
        raise KeyError(f"{where}: unexpected keys {extra[:4]} (expected {n_layers} decoder layers)")
    heads.load_state_dict({k: delta[k].float() for k in own}, strict=True)
    return heads.eval()
