"""A small DeiT-style Vision Transformer for 32x32 inputs, on the block-sequence protocol.

Learngene Pool (Shi et al., AAAI 2024) and SN-Net (Pan et al., CVPR 2023) work on DeiT blocks;
this is their setting scaled to CIFAR: patch 4 -> 64 tokens + a cls token, a learned positional
embedding, pre-norm blocks (``h + attn(norm1(h))``, then ``h + mlp(norm2(h))``), the head a
LayerNorm and a linear layer on the cls token. Attention runs through
``F.scaled_dot_product_attention`` (a fused kernel on GPUs; also exports to ONNX).

Why not timm (checked 2026-12-03): timm 1.0.31 declares ``Requires-Dist: torchvision`` and
``import timm`` fails without it (``timm/layers/create_norm.py`` and ``norm_act.py`` import
``torchvision.ops.misc.FrozenBatchNorm2d`` at module level, and ``timm/layers/__init__.py``
imports both). The torchvision wheels on the index do not fit this torch build: 0.29.1 requires
``torch>=2.14.0`` (pip would replace torch), and 0.28.0 (``torch==2.13.0``) is a ``+cu130``
build whose ``_C.so`` links ``libtorch_cuda.so`` and ``libcudart.so.13``, absent from the CPU
torch. So the blocks are written here (~150 lines); parameter names follow timm's where a
counterpart exists (``qkv``, ``proj``, ``fc1``, ``fc2``, ``norm1``, ``norm2``, ``cls_token``,
``pos_embed``).

The block-sequence protocol (``metamorph.models.blockseq``):
``forward(x) == head(blocks[-1](...blocks[0](stem(x))))``; tokens ``(B, 1 + 64, D)`` flow
through every block, so ``stem_dim`` is D, ``block_dims`` ``[D] * depth``, ``block_stages`` all 0 and stitches
are linear maps on the token dimension. Each block also has ``forward_with_attn(h) -> (h_out,
attn_out)``, ``attn_out`` being the attention sub-layer's output before its residual add (the
attention-output MSE of Learngene Pool's distillation).

Parameter names::

    stem.proj (conv patch x patch, stride patch), stem.cls_token, stem.pos_embed
    blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2
    head.norm, head.fc
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from metamorph.models.registry import register_family, register_model
from metamorph.models.resnet_cifar import CIFAR10_MEAN, CIFAR10_STD


@dataclass
class ViTArch:
    """Everything needed to rebuild a :class:`CifarViT` (JSON-serialisable, like ResNetArch).

    ``drop_path`` is the stochastic-depth rate of the last block (linearly from 0 at the first,
    as in DeiT); it only acts in training mode, so evaluation is deterministic.
    """

    embed_dim: int = 128
    depth: int = 12
    num_heads: int = 4
    mlp_ratio: float = 4.0
    patch_size: int = 4
    img_size: int = 32
    in_channels: int = 3
    num_classes: int = 10
    qkv_bias: bool = True
    drop_path: float = 0.0
    norm_eps: float = 1e-6
    mean: list[float] = field(default_factory=lambda: list(CIFAR10_MEAN))
    std: list[float] = field(default_factory=lambda: list(CIFAR10_STD))

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "img_size", "in_channels"):
            setattr(self, name, int(getattr(self, name)))
        self.num_classes = int(self.num_classes)
        self.mlp_ratio, self.drop_path = float(self.mlp_ratio), float(self.drop_path)
        self.norm_eps = float(self.norm_eps)
        self.qkv_bias = bool(self.qkv_bias)
        self.mean = [float(m) for m in self.mean]
        self.std = [float(s) for s in self.std]
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ViT {name}={getattr(self, name)}; it must be >= 1")
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
                "choose a width that is a multiple of the head count"
            )
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}"
            )
        if int(self.embed_dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} leaves the MLP no hidden units")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path={self.drop_path}; it must be in [0, 1)")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std need one value per input channel")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTArch:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViTArch fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


class PatchEmbed(nn.Module):
    """The stem: non-overlapping patches -> tokens, a cls token in front, plus positions."""

    def __init__(self, arch: ViTArch) -> None:
        super().__init__()
        d, p = arch.embed_dim, arch.patch_size
        self.img_size = arch.img_size
        self.proj = nn.Conv2d(arch.in_channels, d, p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + arch.num_patches, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"this ViT takes {self.img_size}x{self.img_size} images (its positional "
                f"embedding is fixed), got {tuple(x.shape[-2:])}"
            )
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed


class Attention(nn.Module):
    """Multi-head self-attention (``scaled_dot_product_attention``) with an output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d_head)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's residual branch with probability ``p`` in training,
    scaling the kept ones by 1/(1-p); the identity in evaluation."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
        return x * mask.bernoulli_(keep) / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ViTBlock(nn.Module):
    """Pre-norm transformer block; :meth:`forward_with_attn` also returns the attention output."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_hidden: int,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)

    def forward_with_attn(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_out, attn_out)``: ``attn_out = attn(norm1(h))``, before the residual add."""
        a = self.attn(self.norm1(h))
        h = h + self.drop_path1(a)
        return h + self.drop_path2(self.mlp(self.norm2(h))), a

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attn(h)[0]


class ViTHead(nn.Module):
    """Final LayerNorm and the classifier on the cls token (LayerNorm is per token, so norming
    only the cls token equals DeiT's norm-all-then-pool)."""

    def __init__(self, dim: int, num_classes: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, num_classes)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h[:, 0])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(h))


class CifarViT(nn.Module):
    """A ViT built from a :class:`ViTArch`: ``stem`` -> ``blocks`` -> ``head``."""

    stitch_kind = "linear"

    def __init__(self, arch: ViTArch) -> None:
        super().__init__()
        self.arch = arch
        self.stem = PatchEmbed(arch)
        rates = [arch.drop_path * i / max(1, arch.depth - 1) for i in range(arch.depth)]
        self.blocks = nn.ModuleList(
            ViTBlock(
                arch.embed_dim, arch.num_heads, arch.mlp_hidden, arch.qkv_bias, r, arch.norm_eps
            )
            for r in rates
        )
        self.head = ViTHead(arch.embed_dim, arch.num_classes, arch.norm_eps)
        self._init_weights()

    @property
    def stem_dim(self) -> int:
        """Width of block 0's input (the stem's tokens), for stitching into block 0."""
        return self.arch.embed_dim

    @property
    def block_dims(self) -> list[int]:
        return [self.arch.embed_dim] * self.arch.depth

    @property
    def block_stages(self) -> list[int]:
        return [0] * self.arch.depth

    def _init_weights(self) -> None:
        """DeiT's (timm's default): normal with std 0.02 for linear weights, the cls token and
        the positions (timm's ``trunc_normal_`` cuts at +-2 absolute, so in effect uncut);
        zero biases; LayerNorm at identity; the patch conv keeps PyTorch's init."""
        nn.init.trunc_normal_(self.stem.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.stem.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def conv_bn_pairs(self) -> list[tuple[str, str]]:
        """No BatchNorm anywhere, so folding (``model.fold_bn=true``) has nothing to do."""
        return []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input: the normed cls token after the last block."""
        h = self.stem(x)
        for blk in self.blocks:
            h = blk(h)
        return self.head.features(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.fc(self.forward_features(x))


register_family("cifar_vit", CifarViT, lambda arch: CifarViT(ViTArch.from_dict(dict(arch))))

# DeiT's tiny/small/base keep width 1:2:4 at a fixed head width (192/384/768, 3/6/12 heads of
# 64); scaled to CIFAR: 32/64/128 wide with heads of 32, 12 blocks (the Learngene Pool
# reference's small-scale ancestry is the base one, ~2.4 M parameters).
SIZES = {
    "vit_tiny_c10": dict(embed_dim=32, num_heads=1),
    "vit_small_c10": dict(embed_dim=64, num_heads=2),
    "vit_base_c10": dict(embed_dim=128, num_heads=4),
}


def _make_vit(name: str, size: dict) -> Callable[..., nn.Module]:
    def builder(**kwargs) -> nn.Module:
        return CifarViT(ViTArch.from_dict({**size, **kwargs}))

    builder.__name__ = name
    builder.__doc__ = (
        f"DeiT-style ViT for 32x32 inputs, width {size['embed_dim']}, {size['num_heads']} "
        "heads, 12 blocks, patch 4 (keyword arguments override any ViTArch field)."
    )
    return builder


for _name, _size in SIZES.items():
    register_model(_make_vit(_name, _size))
