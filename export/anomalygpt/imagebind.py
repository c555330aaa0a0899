"""ImageBind's vision and text towers in PyTorch, loading `imagebind_huge.pth` unchanged.

Module paths reproduce the checkpoint's key names (`modality_preprocessors.vision.rgbt_stem.proj.1.weight`,
`modality_trunks.vision.blocks.N.attn.in_proj_weight`, `modality_heads.text.proj.1.weight`, ...), so the
real file and a tiny random replica of it load the same way; sizes are read from the checkpoint's
shapes. Only the two towers AnomalyGPT uses are built: the checkpoint's audio, depth, thermal and IMU
entries are left unread.

What ImageBind does, in its terms:
- vision: the image repeated into a 2-frame clip, a Conv3d (2 x 14 x 14, no bias) into patch tokens,
  a CLS token and learned position embeddings, a LayerNorm before the trunk, pre-norm transformer
  blocks (nn.MultiheadAttention, GELU MLP, LayerNorm eps 1e-6), head = LayerNorm, CLS token, Linear
  without bias, output L2-normalized. AnomalyGPT also taps the tokens after four blocks.
- text: token + position embeddings, causally masked blocks, head = the end-of-text token (the highest
  token id) through LayerNorm and Linear, L2-normalized and multiplied by the learned logit scale.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6
# ImageBind-Huge: both towers have 16 heads (not recorded in the checkpoint's shapes).
HEADS = 16
VISION = "vision"
TEXT = "text"


@dataclass(frozen=True)
class ImageBindConfig:
    vision_width: int
    vision_blocks: int
    text_width: int
    text_blocks: int
    embed_dim: int  # the joint embedding both heads project to
    patch: int
    image_size: int
    context_length: int
    vocab_size: int
    heads: int = HEADS

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    def default_taps(self) -> tuple[int, ...]:
        """AnomalyGPT's layers 7, 15, 23, 31 of 32: the last block of each quarter, for any depth."""
        n = self.vision_blocks
        return tuple((i + 1) * n // 4 - 1 for i in range(4))


HUGE = ImageBindConfig(vision_width=1280, vision_blocks=32, text_width=1024, text_blocks=24, embed_dim=1024,
                       patch=14, image_size=224, context_length=77, vocab_size=49408)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters and arithmetic (q, k, v from one packed projection), written
    out with plain ops so the ONNX graph is the same on every exporter version."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, w = x.shape
        hd = w // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)
        if mask is not None:
            att = att + mask
        out = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, w)
        return self.out_proj(out)


class Mlp(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.norm_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width)
        self.norm_2 = nn.LayerNorm(width, eps=LN_EPS)

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm_1(x), mask)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """Tokens are batch-first here; ImageBind runs them sequence-first, which changes nothing."""

    def __init__(self, width: int, blocks: int, heads: int, pre_norm: bool):
        super().__init__()
        # Index 0 as in ImageBind's Sequential(LayerNorm or Identity, Rearrange).
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(width, eps=LN_EPS) if pre_norm else nn.Identity())
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(blocks)])

    def forward(self, x, mask=None, taps: tuple[int, ...] = ()):
        x = self.pre_transformer_layer(x)
        tapped = []
        for i, block in enumerate(self.blocks):
            x = block(x, mask)
            if i in taps:
                tapped.append(x)
        return x, tapped


class VisionPreprocessor(nn.Module):
    def __init__(self, cfg: ImageBindConfig):
        super().__init__()
        w = cfg.vision_width
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        # proj.0 is ImageBind's PadIm2Video (no parameters); proj.1 the Conv3d.
        self.rgbt_stem = nn.Module()
        self.rgbt_stem.proj = nn.Sequential(nn.Identity(), nn.Conv3d(3, w, (2, cfg.patch, cfg.patch),
                                                                     stride=(2, cfg.patch, cfg.patch), bias=False))
        self.pos_embedding_helper = nn.Module()
        self.pos_embedding_helper.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, w))

    def forward(self, image):
        clip = image.unsqueeze(2).repeat(1, 1, 2, 1, 1)  # an image is a clip of two identical frames
        tokens = self.rgbt_stem.proj[1](clip).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embedding_helper.pos_embed


class TextPreprocessor(nn.Module):
    def __init__(self, cfg: ImageBindConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.text_width))
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
        self.register_buffer("mask", mask)

    def forward(self, tokens):
        return self.token_embedding(tokens) + self.pos_embed


class TextHead(nn.Module):
    def __init__(self, width: int, out: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(width, eps=LN_EPS), nn.Linear(width, out, bias=False))

    def forward(self, x, tokens):
        eot = tokens.argmax(dim=-1)  # CLIP's end-of-text token has the highest id
        return self.proj(x[torch.arange(x.shape[0]), eot])


class LogitScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x):
        return torch.clip(self.log_logit_scale.exp(), max=100) * x


class ImageBind(nn.Module):
    """The vision and text towers of ImageBind (the checkpoint's other modalities are not built)."""

    def __init__(self, cfg: ImageBindConfig):
        super().__init__()
        self.cfg = cfg
        self.modality_preprocessors = nn.ModuleDict({VISION: VisionPreprocessor(cfg), TEXT: TextPreprocessor(cfg)})
        self.modality_trunks = nn.ModuleDict({
            VISION: Trunk(cfg.vision_width, cfg.vision_blocks, cfg.heads, pre_norm=True),
            TEXT: Trunk(cfg.text_width, cfg.text_blocks, cfg.heads, pre_norm=False),
        })
        self.modality_heads = nn.ModuleDict({
            # Index 1 is ImageBind's SelectElement(0) (no parameters).
            VISION: nn.Sequential(nn.LayerNorm(cfg.vision_width, eps=LN_EPS), nn.Identity(),
                                  nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)),
            TEXT: TextHead(cfg.text_width, cfg.embed_dim),
        })
        # Index 0 is ImageBind's Normalize (no parameters).
        self.modality_postprocessors = nn.ModuleDict({TEXT: nn.Sequential(nn.Identity(), LogitScale())})

    def encode_image(self, image: torch.Tensor, taps: tuple[int, ...]):
        """N x 3 x H x W normalized image -> (N x embed_dim unit embedding, [N x (1 + grid²) x width] per tap)."""
        tokens = self.modality_preprocessors[VISION](image)
        x, tapped = self.modality_trunks[VISION](tokens, taps=taps)
        head = self.modality_heads[VISION]
        embedding = head[2](head[0](x)[:, 0])
        return F.normalize(embedding, dim=-1), tapped

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """N x context_length token ids -> N x embed_dim, unit length times the logit scale (as ImageBind)."""
        x = self.modality_preprocessors[TEXT](tokens)
        x, _ = self.modality_trunks[TEXT](x, mask=self.modality_preprocessors[TEXT].mask)
        x = self.modality_heads[TEXT](x, tokens)
        return self.modality_postprocessors[TEXT][1](F.normalize(x, dim=-1))


def _count_blocks(state: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(ids) + 1 if ids else 0


def config_from_state_dict(state: dict, where: str, heads: int = HEADS) -> ImageBindConfig:
    """Sizes of both towers from the checkpoint's shapes; KeyError-free: a missing key is named."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise KeyError(f"{where}: key '{key}' is missing (not an ImageBind checkpoint?)")
        return tuple(state[key].shape)

    conv = shape("modality_preprocessors.vision.rgbt_stem.proj.1.weight")
    tokens = shape("modality_preprocessors.vision.pos_embedding_helper.pos_embed")[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"{where}: modality_preprocessors.vision.pos_embedding_helper.pos_embed has {tokens} patch "
                         "positions, expected a square grid")
    vocab, text_width = shape("modality_preprocessors.text.token_embedding.weight")
    cfg = ImageBindConfig(
        vision_width=conv[0], vision_blocks=_count_blocks(state, "modality_trunks.vision.blocks."),
        text_width=text_width, text_blocks=_count_blocks(state, "modality_trunks.text.blocks."),
        embed_dim=shape("modality_heads.vision.2.weight")[0], patch=conv[-1], image_size=grid * conv[-1],
        context_length=shape("modality_preprocessors.text.pos_embed")[1], vocab_size=vocab, heads=heads)
    for name, width, blocks in ((VISION, cfg.vision_width, cfg.vision_blocks), (TEXT, cfg.text_width, cfg.text_blocks)):
        if blocks == 0:
            raise KeyError(f"{where}: no 'modality_trunks.{name}.blocks.N.*' keys (not an ImageBind checkpoint?)")
        if width % heads:
            raise ValueError(f"{where}: {name} width {width} is not divisible by {heads} attention heads")
    return cfg


def load_imagebind(state: dict, where: str) -> ImageBind:
    """The two towers with every vision/text tensor of `state` loaded; missing, extra or misshaped ones named."""
    cfg = config_from_state_dict(state, where)
    model = ImageBind(cfg)
    own = model.state_dict()
    wanted = {k: v for k, v in state.items() if k.split(".")[1:2] in ([VISION], [TEXT])}
    missing = sorted(set(own) - set(wanted))
    unexpected = sorted(set(wanted) - set(own))
    if missing or unexpected:
        raise KeyError(f"{where}: ImageBind {cfg.vision_blocks}-block vision / {cfg.text_blocks}-block text towers "
                       f"do not match the checkpoint: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in wanted.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{where}: '{k}' has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in wanted.items()}, strict=True)
    return model.eval()
