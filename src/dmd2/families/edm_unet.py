"""The EDM family's small network: a class-conditional UNet for laptop-sized experiments (`architecture: unet`),
preconditioned like EDM's own networks by `edm_networks.Preconditioned`.

The UNet is deliberately plain (ResBlocks, optional self-attention, skip connections) so it runs on a laptop
CPU. `forward(..., features_only=True)` stops after the middle blocks and returns their output: the
diffusion-GAN head of DMD2 reads those features on the fake critic, so its forward never runs the decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from dmd2.config import Strict


class UNetConfig(Strict):
    channels: int = Field(32, ge=4, description="base channel count")
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 2], description="per-resolution multipliers")
    num_res_blocks: int = Field(1, ge=1)
    attention_levels: list[int] = Field(default_factory=list, description="levels (0 = full res) with attention")
    dropout: float = Field(0.0, ge=0, lt=1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class FourierEmbedding(nn.Module):
    """Sinusoidal embedding of the scalar noise level c_noise."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        # c_noise = ln(sigma)/4 is O(1); scale it so that neighbouring sigmas get distinct embeddings.
        args = (c_noise.float() * 250.0)[:, None] * self.freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out * 2)  # scale and shift
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class SelfAttention(nn.Module):
    def __init__(self, channels: int, heads: int = 1):
        super().__init__()
        self.norm, self.heads = _norm(channels), heads
        self.qkv = nn.Conv2d(channels, channels * 3, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """F(c_in·x, c_noise, label) of EDM: a raw network, preconditioned by `edm_networks.Preconditioned`."""

    def __init__(self, cfg: UNetConfig, in_channels: int, resolution: int, label_dim: int):
        super().__init__()
        self.cfg, self.label_dim, self.resolution = cfg, label_dim, resolution
        self.gradient_checkpointing = False
        ch, emb_dim = cfg.channels, cfg.channels * 4
        self.noise_embed = nn.Sequential(FourierEmbedding(ch), nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Linear(label_dim, emb_dim, bias=False) if label_dim else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        self.down, skips, c = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(ResBlock(c, ch * mult, emb_dim, cfg.dropout))
                c = ch * mult
                if level in cfg.attention_levels:
                    self.down.append(SelfAttention(c))
                skips.append(c)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, cfg.dropout), SelfAttention(c), ResBlock(c, c, emb_dim, cfg.dropout)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), ch * mult, emb_dim, cfg.dropout))
                c = ch * mult
                if level in cfg.attention_levels:
                    self.up.append(SelfAttention(c))
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(block, ResBlock | SelfAttention):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(block, h, emb, use_reentrant=False)
            return block(h, emb)
        return block(h)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None,
                features_only: bool = False) -> torch.Tensor:
        """F(x, c_noise, labels); with `features_only`, the middle blocks' output (the GAN head's input)."""
        emb = self.noise_embed(c_noise)
        if self.label_embed is not None and labels is not None:
            emb = emb + self.label_embed(labels.to(emb.dtype))
        emb = F.silu(emb)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb)
            if not isinstance(block, SelfAttention):
                hs.append(h)
            else:
                hs[-1] = h
        for block in self.mid:
            h = self._run(block, h, emb)
        if features_only:
            return h
        for block in self.up:
            if isinstance(block, ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(block, h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
