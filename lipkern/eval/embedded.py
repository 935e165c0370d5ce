"""The two embedded models, one per family the paper evaluates, sized for 8x8 digits.

* ``PreActWRN``: pre-activation WideResNet-style CNN (BN -> ReLU -> conv), block structure as in
  RobustBench's WideResNet: the shortcut 1x1 conv reads the block's BN -> ReLU output, so that 1x1 conv
  has a remapped input and enters the Lipschitz table.
* ``TinyViT``: ViT/Swin-style transformer whose MLP blocks are LayerNorm -> FC1 -> GELU -> FC2, with timm's
  module names (``blocks.<i>.mlp.fc1`` ...) so ``lipkern.convert(..., inputs_of=("*.mlp.fc1",))`` finds them.

Every activation call site is its own module, so conversion gives one threshold per site.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class PreActBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(self.relu2(self.bn2(o)))
        return o + skip


class PreActWRN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths=(16, 32, 64), blocks_per_stage: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers, c = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                layers.append(PreActBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        o = self.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(o, 1), 1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, patch: int = 2,
                 dim: int = 48, depth: int = 3, heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(1))


# name -> (constructor, lipkern.convert keyword arguments that place the remap where the paper does)
EMBEDDED = {
    "preact_wrn": (PreActWRN, dict(acts=("relu",), inputs_of=())),
    "tiny_vit": (TinyViT, dict(acts=("gelu",), inputs_of=("*.mlp.fc1",))),
}


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"digits_{name}.pt"


def load_embedded(name: str) -> nn.Module:
    """An embedded model with its shipped adversarially trained weights (``python -m lipkern.eval.train``)."""
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; choose from {sorted(EMBEDDED)}")
    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"embedded weights missing: {path}; rebuild them with "
                                f"`python -m lipkern.eval.train --model {name}`")
    model = EMBEDDED[name][0]()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
