"""EVA-CLIP vision encoder as Emu2 uses it, and `encode_image` (mean-pooled patch grid).

Matches the official `EVAVisionTransformer` configuration of Emu2 (official-format section 2.1/3): post-norm
blocks without layer scale, one fused qkv weight with separate q and v biases (k has none), exact-GELU MLP,
a learned absolute position embedding that includes the CLS token, no final norm, every token returned.
Parameter names equal the official ones under ``visual.``, so official weights load without renaming.

Two options exist for small encoders trained from scratch (`Emu2VisionConfig`): pre-norm blocks with a final
``norm`` (``postnorm=False``, EVA-02-CLIP B/L) and a convolutional stem (``stem="conv"``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Emu2VisionConfig


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        # The official module keeps q and v biases apart and gives k none.
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, Dv) -> (B, N, Dv)."""
        B, N, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Post-norm (EVA-CLIP `postnorm=True`, Emu2): x + norm1(attn(x)), then x + norm2(mlp(x)).
    Pre-norm (``postnorm=False``): x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, config: Emu2VisionConfig):
        super().__init__()
        self.postnorm = config.postnorm
        self.norm1 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = Attention(config.width, config.width // config.head_width)
        self.norm2 = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.mlp = Mlp(config.width, config.mlp_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postnorm:
            x = x + self.norm1(self.attn(x))
            return x + self.norm2(self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """``stem="patch"``: one convolution per patch (``proj``, the official layer). ``stem="conv"``: log2(patch)
    stride-2 3x3 convolutions, widths doubling up to ``width``, then one stride-1 3x3 convolution, GELU between
    (``stem.N``): each token is built from overlapping receptive fields that reach its neighbours, instead of
    one linear map of its own pixels. ``stem_norm``: a GroupNorm after each stride-2 convolution (8 groups, fewer
    where the width is not a multiple of 8)."""

    def __init__(self, config: Emu2VisionConfig):
        super().__init__()
        if config.stem == "patch":
            self.proj = nn.Conv2d(3, config.width, kernel_size=config.patch_size, stride=config.patch_size)
        elif config.stem == "conv":
            halvings = config.patch_size.bit_length() - 1
            if config.patch_size != 1 << halvings or halvings < 1:
                raise ValueError(f'stem="conv" needs a power-of-two patch_size >= 2, got {config.patch_size}')
            widths = [3] + [max(8, config.width >> (halvings - i)) for i in range(1, halvings)] + [config.width]
            layers = []
            for i in range(halvings):
                layers.append(nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, stride=2, padding=1))
                if config.stem_norm:
                    layers.append(nn.GroupNorm(math.gcd(8, widths[i + 1]), widths[i + 1]))
                layers.append(nn.GELU())
            layers.append(nn.Conv2d(config.width, config.width, kernel_size=3, stride=1, padding=1))
            self.stem = nn.Sequential(*layers)
        else:
            raise ValueError(f'stem must be "patch" or "conv", got {config.stem!r}')
        if config.stem_norm and config.stem != "conv":
            raise ValueError('stem_norm=True needs stem="conv" (the patch stem is one convolution)')

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, Dv), patches row-major."""
        grid = self.proj(pixels) if hasattr(self, "proj") else self.stem(pixels)
        return grid.flatten(2).transpose(1, 2)


def sincos_position_table(grid: int, width: int) -> torch.Tensor:
    """The 2D sine-cosine position table of MAE (He et al. 2022): ``(1 + grid*grid, width)``, a zero row for CLS
    first, then the patches row-major. Half the channels code the row, half the column, each as sines then
    cosines at frequencies 1 / 10000^(k / (width/4)). Every patch then carries a distinct absolute code from the
    first step. A small encoder trained to pool attributes has no reason to learn one, and the LM's attention
    positions are relative, so without it a visual embedding does not say where its patch is: the code is there
    for grounding. Measured (docs/training-notes.md): the same probe read-out as N(0, 0.02) at equal steps;
    grounding in the quickstart still 0 %."""
    if width % 4:
        raise ValueError(f"a sine-cosine position table needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    angles = [axis.reshape(-1, 1) * omega for axis in (rows, cols)]
    table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()


class EVAVisionTransformer(nn.Module):
    """The ViT trunk. ``forward(pixels (B, 3, S, S)) -> (B, 1 + N, Dv)`` (CLS first; no final norm when
    post-norm, as in Emu2)."""

    def __init__(self, config: Emu2VisionConfig):
        super().__init__()
        self.config = config
        num_patches = (config.image_size // config.patch_size) ** 2
        if config.pos_embed_init not in ("normal", "sincos"):
            raise ValueError(f'pos_embed_init must be "normal" or "sincos", got {config.pos_embed_init!r}')
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, config.width))
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.layers)])
        # Pre-norm blocks leave the residual stream unnormalised: EVA-02-CLIP closes them with one norm.
        self.norm = None if config.postnorm else nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels.to(self.pos_embed.dtype))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x if self.norm is None else self.norm(x)

    def encode_image(self, pixels: torch.Tensor, n_query: int) -> torch.Tensor:
        """Pooled visual embeddings: ``pixels (B, 3, S, S) -> (B, n_query, Dv)``.

        Drops CLS, lays the patches out on their grid and average-pools with kernel = stride =
        grid // sqrt(n_query), as the official `encode_image` (a 32x32 grid -> 8x8 for n_query 64).
        """
        return self.pool(self(pixels), n_query)

    @staticmethod
    def pool(tokens: torch.Tensor, n_query: int) -> torch.Tensor:
        """The pooling of `encode_image` on trunk outputs: ``(B, 1 + N, Dv) -> (B, n_query, Dv)``."""
        tokens = tokens[:, 1:]
        B, N, D = tokens.shape
        grid = math.isqrt(N)
        side = math.isqrt(n_query)
        if side * side != n_query or grid % side:
            raise ValueError(f"n_query={n_query} must be a square whose side divides the {grid}x{grid} patch grid")
        grid_map = tokens.transpose(1, 2).reshape(B, D, grid, grid)
        pooled = F.avg_pool2d(grid_map, kernel_size=grid // side, stride=grid // side)
        return pooled.flatten(2).transpose(1, 2)
