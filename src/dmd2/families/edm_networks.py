"""The networks of EDM's released checkpoints, written for this project from the papers and the checkpoints'
state-dict manifests: ADM (Dhariwal & Nichol 2021), EDM's ImageNet-64 network, and DDPM++ / NCSN++ (Song et al.
2021), its CIFAR-10 networks, with the preconditioning of Karras et al. 2022 (Table 1).

What has to match EDM is its *interface*: parameter names, their order and shapes (so converted weights load
strictly: `tests/data/edm/*.json`) and the numbers the networks compute (`tests/data/edm/reference-outputs.*`).
Both are tested. The structure is our own: a network is a list of resolution `Level`s, each naming the modules it
owns in the two tables EDM's checkpoints expect — `enc` (fine → coarse) and `dec` (coarse → fine), keyed
`<res>x<res>_<part>` — and the forward pass walks the levels.

`features_only=True` returns the encoder's output, before the lowest level's two `in0`/`in1` blocks that open
`dec`: where the original DMD2 attaches its diffusion-GAN head for these networks (768×8×8 for ImageNet-64 ADM).
Dropout stays configurable; distillation sets it to 0, as DMD2 does. A network built here (a teacher trained from
scratch) starts as its paper describes: ADM with torch's default fan-in initialisation, DDPM++/NCSN++ Glorot-uniform
(Song et al.'s fan-average variance scaling); in both, the layers that close a residual branch and the output
convolutions start at or near zero, so every block starts as the identity.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# --------------------------------------------------------------------------------------------- resampling


def fir_kernel(taps: list[int] | tuple[int, ...]) -> torch.Tensor:
    """The separable 2-D low-pass filter of 1-D `taps`, normalised to unit DC gain, shaped (1, 1, k, k)."""
    t = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(t, t) / t.sum() ** 2)[None, None]


def fir_downsample(x: torch.Tensor, kernel: torch.Tensor, padding: int) -> torch.Tensor:
    """Low-pass filter each channel with `kernel`, keeping every second pixel."""
    channels = x.shape[1]
    weight = kernel.to(x.dtype).expand(channels, 1, -1, -1)
    return F.conv2d(x, weight, stride=2, padding=padding, groups=channels)


def fir_upsample(x: torch.Tensor, kernel: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-stuff each channel to twice the size and interpolate with `kernel` (gain 4 keeps the mean)."""
    channels = x.shape[1]
    weight = (4 * kernel).to(x.dtype).expand(channels, 1, -1, -1)
    return F.conv_transpose2d(x, weight, stride=2, padding=padding, groups=channels)


class ResamplingConv(nn.Module):
    """A k×k convolution (none when k = 0) with an optional 2× FIR up- or down-sampling before it. `fused`
    down-sampling filters *after* a convolution padded wider instead (NCSN++'s image branch uses that order).
    The filter is a buffer, as EDM's checkpoints store it."""

    def __init__(self, c_in: int, c_out: int, kernel: int, resample: str | None = None,
                 taps: tuple[int, ...] = (1, 1), fused: bool = False):
        super().__init__()
        self.resample, self.fused = resample, fused
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(c_out)) if kernel else None
        if resample is not None:
            self.register_buffer("resample_filter", fir_kernel(taps))
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # torch's own default; networks re-initialise

    def _conv(self, x: torch.Tensor, padding: int) -> torch.Tensor:
        if self.weight is None:
            return x
        return F.conv2d(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                        padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half_kernel = 0 if self.weight is None else self.weight.shape[-1] // 2
        if self.resample is None:
            return self._conv(x, half_kernel)
        half_filter = (self.resample_filter.shape[-1] - 1) // 2
        if self.resample == "up":
            return self._conv(fir_upsample(x, self.resample_filter, half_filter), half_kernel)
        if self.fused and self.weight is not None:
            return fir_downsample(self._conv(x, half_kernel + half_filter), self.resample_filter, 0)
        return self._conv(fir_downsample(x, self.resample_filter, half_filter), half_kernel)


def group_norm(channels: int, eps: float) -> nn.GroupNorm:
    """32 groups, fewer when that would leave under 4 channels in a group."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


# ------------------------------------------------------------------------------------------- the block


@dataclass(frozen=True)
class BlockStyle:
    """What differs between ADM's residual blocks and DDPM++/NCSN++'s."""

    eps: float                 # GroupNorm epsilon
    scale_shift: bool          # the embedding modulates as (1 + scale)·norm(h) + shift, else it is added before norm
    project_skip: bool         # a 1×1 convolution on a resampled shortcut even when the width is unchanged
    output_gain: float         # each residual sum is multiplied by this (√½ keeps DDPM++'s variance)
    taps: tuple[int, ...]      # FIR filter of the resampling convolutions
    channels_per_head: int     # attention heads = width // this; 0: one head
    dropout: float


class ResBlock(nn.Module):
    """GroupNorm–SiLU–conv twice with the noise embedding in between, a shortcut, then optionally self-attention
    (a residual of its own). Up/down-sampling blocks resample in the first convolution and in the shortcut."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, style: BlockStyle, resample: str | None = None,
                 attention: bool = False):
        super().__init__()
        self.scale_shift, self.output_gain, self.dropout = style.scale_shift, style.output_gain, style.dropout
        self.heads = (1 if style.channels_per_head == 0 else c_out // style.channels_per_head) if attention else 0
        self.norm0 = group_norm(c_in, style.eps)
        self.conv0 = ResamplingConv(c_in, c_out, 3, resample, style.taps)
        self.affine = nn.Linear(emb_dim, 2 * c_out if style.scale_shift else c_out)
        self.norm1 = group_norm(c_out, style.eps)
        self.conv1 = ResamplingConv(c_out, c_out, 3)
        self.skip = None  # the identity, unless the shortcut must change the width or the size
        if resample is not None or c_in != c_out:
            projects = style.project_skip or c_in != c_out
            self.skip = ResamplingConv(c_in, c_out, 1 if projects else 0, resample, style.taps)
        if self.heads:
            self.norm2 = group_norm(c_out, style.eps)
            self.qkv = ResamplingConv(c_out, 3 * c_out, 1)
            self.proj = ResamplingConv(c_out, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        modulation = self.affine(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = modulation.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * (scale + 1) + shift)
        else:
            h = F.silu(self.norm1(h + modulation))
        h = self.conv1(F.dropout(h, self.dropout, self.training))
        shortcut = x if self.skip is None else self.skip(x)
        h = (h + shortcut) * self.output_gain
        if self.heads:
            h = (h + self.proj(self.attend(self.norm2(h)))) * self.output_gain
        return h

    def attend(self, h: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over pixels. The projection's channels are laid out head-major, then channel,
        then (q, k, v) innermost — the layout EDM's weights were trained with."""
        n, c, height, width = h.shape
        per_head = c // self.heads
        q, k, v = self.qkv(h).reshape(n, self.heads, per_head, 3, height * width).unbind(3)
        # (n, heads, per_head, pixels) → (n, heads, pixels, per_head) for torch's attention; softmax over keys
        q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(-1, -2).reshape(n, c, height, width)


# ------------------------------------------------------------------------------------------- embeddings


def sinusoids(x: torch.Tensor, freqs: torch.Tensor, sin_first: bool) -> torch.Tensor:
    """[cos, sin] (or [sin, cos]) of x·freqs for each x: (N,) → (N, 2·len(freqs))."""
    angles = torch.outer(x, freqs.to(x.dtype))
    parts = (angles.sin(), angles.cos()) if sin_first else (angles.cos(), angles.sin())
    return torch.cat(parts, dim=1)


def geometric_freqs(count: int, endpoint: bool, max_period: float = 10_000.0) -> torch.Tensor:
    """`count` frequencies from 1 down to 1/max_period, evenly spaced in log (the last reaches it if `endpoint`)."""
    steps = torch.arange(count, dtype=torch.float32) / (count - 1 if endpoint else count)
    return (1 / max_period) ** steps


class FourierNoise(nn.Module):
    """NCSN++'s random Fourier features: the frequencies are drawn once and stored (`freqs`)."""

    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        return sinusoids(c_noise, 2 * math.pi * self.freqs, sin_first=True)


class PositionalNoise(nn.Module):
    """Transformer-style sinusoidal features of the noise level (no parameters)."""

    def __init__(self, channels: int, endpoint: bool, sin_first: bool):
        super().__init__()
        self.channels, self.endpoint, self.sin_first = channels, endpoint, sin_first

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        freqs = geometric_freqs(self.channels // 2, self.endpoint).to(c_noise.device)
        return sinusoids(c_noise, freqs, self.sin_first)


# ----------------------------------------------------------------------------------------- the U-Net


class Level(TypedDict):
    """One resolution of the U-Net and the keys of the modules it owns in `enc` and `dec`. (A plain dict, so a
    network pickles with nothing but torch's and Python's own types, as EDM's checkpoints do.)"""

    res: int
    entry: str               # enc: the input conv (finest level) or the down block
    image_branch: list[str]  # enc: NCSN++'s image pyramid, after `entry`
    enc_blocks: list[str]
    dec_entry: list[str]     # dec: in0/in1 (coarsest level) or the up block
    dec_blocks: list[str]    # each takes an encoder activation concatenated to its input
    head: list[str]          # dec: [up,] norm, conv of an output branch


def new_level(res: int, part: str) -> Level:
    return Level(res=res, entry=f"{res}x{res}_{part}", image_branch=[], enc_blocks=[], dec_entry=[], dec_blocks=[],
                 head=[])


class EDMUNet(nn.Module):
    """What ADM and DDPM++/NCSN++ share: the layout of the encoder/decoder tables, the walk over levels, label
    handling and gradient checkpointing. Subclasses add the embedding, the image and output branches, and the
    output."""

    def __init__(self, label_dim: int, label_dropout: float):
        super().__init__()
        self.label_dim, self.label_dropout = label_dim, label_dropout
        self.gradient_checkpointing = False
        self.levels: list[Level] = []

    # ---- construction

    def _lay_out(self, img_resolution: int, in_channels: int, stem_width: int, widths: list[int], num_blocks: int,
                 emb_dim: int, style: BlockStyle, attention_at: set[int], every_decoder_block_attends: bool) -> None:
        """Fill `enc` and `dec`, level by level, in the order EDM's checkpoints list them. `widths` are the levels'
        block widths (fine → coarse); the stem convolution maps the image to `stem_width`."""
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()  # after the embedding layers, as in the checkpoints
        saved, width = [], stem_width
        for i, level_width in enumerate(widths):
            res = img_resolution >> i
            level = new_level(res, "conv" if i == 0 else "down")
            self.enc[level["entry"]] = (ResamplingConv(in_channels, stem_width, 3) if i == 0
                                        else ResBlock(width, width, emb_dim, style, resample="down"))
            if i > 0:
                self._add_image_branch(level, width)
            saved.append(width)
            for key in _numbered(res, "block", num_blocks):
                self.enc[key] = ResBlock(width, level_width, emb_dim, style, attention=res in attention_at)
                level["enc_blocks"].append(key)
                width = level_width
                saved.append(width)
            self.levels.append(level)

        for i in reversed(range(len(widths))):
            level, res = self.levels[i], self.levels[i]["res"]
            if i == len(widths) - 1:
                level["dec_entry"] = _numbered(res, "in", 2)
                self.dec[level["dec_entry"][0]] = ResBlock(width, width, emb_dim, style, attention=True)
                self.dec[level["dec_entry"][1]] = ResBlock(width, width, emb_dim, style)
            else:
                level["dec_entry"] = [f"{res}x{res}_up"]
                self.dec[level["dec_entry"][0]] = ResBlock(width, width, emb_dim, style, resample="up")
            for j, key in enumerate(_numbered(res, "block", num_blocks + 1)):
                attend = res in attention_at and (every_decoder_block_attends or j == num_blocks)
                self.dec[key] = ResBlock(width + saved.pop(), widths[i], emb_dim, style, attention=attend)
                level["dec_blocks"].append(key)
                width = widths[i]
            self._add_output_branch(level, i, width)

    def _add_image_branch(self, level: Level, width: int) -> None:
        """Modules that feed the image into a coarser level (none: ADM and DDPM++ see it at the top only)."""

    def _add_output_branch(self, level: Level, index: int, width: int) -> None:
        """Modules that read a level's decoder output into the network's output (none here)."""

    def _residual_outputs(self) -> list[nn.Module]:
        """The layers that close a residual branch; they start at (near) zero so every block starts as identity."""
        blocks = [m for m in self.modules() if isinstance(m, ResBlock)]
        return [layer for b in blocks for layer in (b.conv1, getattr(b, "proj", None)) if layer is not None]

    # ---- the forward pass

    def _labels(self, labels: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """One-hot (or soft) labels as a float batch; none given means all zeros; dropped rows in training."""
        if labels is None:
            return like.new_zeros(like.shape[0], self.label_dim)
        labels = labels.to(like.dtype).reshape(-1, self.label_dim)
        if self.training and self.label_dropout:
            keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
            labels = labels * keep.to(labels.dtype)
        return labels

    def _block(self, table: nn.ModuleDict, key: str, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        block = table[key]
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)

    def encode(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Fine → coarse; returns the coarsest activation and each level's activations for the decoder."""
        saved, image = [], x
        for i, level in enumerate(self.levels):
            x = self.enc[level["entry"]](x) if i == 0 else self._block(self.enc, level["entry"], x, emb)
            x, image = self._join_image(level, x, image)
            saved.append(x)
            for key in level["enc_blocks"]:
                x = self._block(self.enc, key, x, emb)
                saved.append(x)
        return x, saved

    def _join_image(self, level: Level, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, the image pyramid's current level) after `level`'s image branch; unchanged without one."""
        return x, image

    def decode(self, x: torch.Tensor, emb: torch.Tensor,
               saved: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Coarse → fine, consuming the encoder's activations; returns the finest activation and the sum of the
        output branches (None where there are none)."""
        out = None
        for level in reversed(self.levels):
            for key in level["dec_entry"]:
                x = self._block(self.dec, key, x, emb)
            for key in level["dec_blocks"]:
                x = self._block(self.dec, key, torch.cat([x, saved.pop()], dim=1), emb)
            if level["head"]:
                *up, norm, conv = (self.dec[key] for key in level["head"])
                branch = conv(F.silu(norm(x)))
                out = branch if out is None else branch + (up[0](out) if up else out)
        return x, out


def _initialise(net: nn.Module, fan: str, zeroed: list[nn.Module], zero_scale: float, attention_gain: float) -> None:
    """Re-initialise every convolution and linear layer. fan 'avg': Glorot-uniform weights, zero biases (DDPM++);
    fan 'in': weights and biases uniform in ±1/√fan_in, torch's default (ADM). Layers in `zeroed` are scaled by
    `zero_scale`, with zero biases; query/key/value projections by `attention_gain`."""
    for name, module in net.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, ResamplingConv | nn.Linear) or weight is None:
            continue
        bound = weight[0].numel() ** -0.5
        is_zeroed = any(module is z for z in zeroed)
        with torch.no_grad():
            if fan == "avg":
                nn.init.xavier_uniform_(weight)
            else:
                weight.uniform_(-bound, bound)
            weight.mul_(zero_scale if is_zeroed else attention_gain if name.endswith(".qkv") else 1.0)
            if module.bias is not None and fan == "in" and not is_zeroed:
                module.bias.uniform_(-bound, bound)
            elif module.bias is not None:
                module.bias.zero_()


def _numbered(res: int, part: str, count: int) -> list[str]:
    return [f"{res}x{res}_{part}{i}" for i in range(count)]


class ADMUNet(EDMUNet):
    """ADM as EDM configures it for ImageNet-64 (`model_channels` 192, `channel_mult` [1, 2, 3, 4], 3 blocks per
    resolution, attention at 32, 16 and 8 px, 64 channels per head: 296M parameters)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: tuple[int, ...] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: tuple[int, ...] = (32, 16, 8),
                 dropout: float = 0.0, label_dropout: float = 0.0):
        super().__init__(label_dim, label_dropout)
        emb_dim = model_channels * channel_mult_emb
        # Parameters register in EDM's order: the noise map, augmentation, two MLP layers, then the label map.
        self.map_noise = PositionalNoise(model_channels, endpoint=False, sin_first=False)
        self.map_augment = nn.Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = nn.Linear(model_channels, emb_dim)
        self.map_layer1 = nn.Linear(emb_dim, emb_dim)
        self.map_label = nn.Linear(label_dim, emb_dim, bias=False) if label_dim else None

        style = BlockStyle(eps=1e-5, scale_shift=True, project_skip=False, output_gain=1.0, taps=(1, 1),
                           channels_per_head=64, dropout=dropout)
        widths = [model_channels * m for m in channel_mult]
        self._lay_out(img_resolution, in_channels, widths[0], widths, num_blocks, emb_dim, style,
                      set(attn_resolutions), every_decoder_block_attends=True)
        self.out_norm = group_norm(widths[0], 1e-5)
        self.out_conv = ResamplingConv(widths[0], out_channels, 3)

        _initialise(self, "in", [self.out_conv, *self._residual_outputs()], zero_scale=0.0, attention_gain=1.0)
        if self.map_augment is not None:
            nn.init.zeros_(self.map_augment.weight)
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight)  # unit-variance class embeddings

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.map_noise(c_noise)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:  # ADM adds the class after the MLP
            emb = emb + self.map_label(self._labels(labels, emb))
        return F.silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, features_only: bool = False) -> torch.Tensor:
        """F(x, c_noise, labels); with `features_only`, the encoder's output."""
        emb = self.embed(noise_labels, class_labels, augment_labels)
        h, saved = self.encode(x, emb)
        if features_only:
            return h
        h, _ = self.decode(h, emb, saved)
        return self.out_conv(F.silu(self.out_norm(h)))


class SongUNet(EDMUNet):
    """DDPM++ (`embedding_type` positional, standard encoder) and NCSN++ (fourier, residual encoder) as EDM
    configures them for CIFAR-10 (`model_channels` 128, `channel_mult` [2, 2, 2], 4 blocks, attention at 16 px:
    56M parameters); also the 'skip' encoder and decoder of Song et al."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: tuple[int, ...] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: tuple[int, ...] = (16,),
                 dropout: float = 0.0, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: tuple[int, ...] = (1, 1)):
        super().__init__(label_dim, label_dropout)
        for name, value, allowed in (("embedding_type", embedding_type, ("positional", "fourier")),
                                     ("encoder_type", encoder_type, ("standard", "skip", "residual")),
                                     ("decoder_type", decoder_type, ("standard", "skip"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        emb_dim, noise_dim = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        # Parameters register in EDM's order: the noise map, the label map, augmentation, two MLP layers.
        self.map_noise = (FourierNoise(noise_dim) if embedding_type == "fourier"
                          else PositionalNoise(noise_dim, endpoint=True, sin_first=True))
        self.map_label = nn.Linear(label_dim, noise_dim) if label_dim else None
        self.map_augment = nn.Linear(augment_dim, noise_dim, bias=False) if augment_dim else None
        self.map_layer0 = nn.Linear(noise_dim, emb_dim)
        self.map_layer1 = nn.Linear(emb_dim, emb_dim)

        # what the branch hooks below need while `_lay_out` runs
        self.encoder_type, self.decoder_type, self.out_channels = encoder_type, decoder_type, out_channels
        self.taps, self._image_width, self._coarsest = tuple(resample_filter), in_channels, len(channel_mult) - 1
        style = BlockStyle(eps=1e-6, scale_shift=False, project_skip=True, output_gain=math.sqrt(0.5),
                           taps=self.taps, channels_per_head=0, dropout=dropout)
        self._lay_out(img_resolution, in_channels, model_channels, [model_channels * m for m in channel_mult],
                      num_blocks, emb_dim, style, set(attn_resolutions), every_decoder_block_attends=False)

        output_convs = [self.dec[level["head"][-1]] for level in self.levels if level["head"]]
        _initialise(self, "avg", [*output_convs, *self._residual_outputs()], zero_scale=1e-5,
                    attention_gain=math.sqrt(0.2))

    def _add_image_branch(self, level: Level, width: int) -> None:
        """'skip': the image, FIR-downsampled level by level, is projected (1×1) and added; 'residual': a strided
        3×3 convolution of the previous level's sum is added, and the sum becomes the next level's image."""
        tag = f"{level['res']}x{level['res']}"
        if self.encoder_type == "skip":
            level["image_branch"] = [f"{tag}_aux_down", f"{tag}_aux_skip"]
            self.enc[level["image_branch"][0]] = ResamplingConv(self._image_width, self._image_width, 0, "down",
                                                                self.taps)
            self.enc[level["image_branch"][1]] = ResamplingConv(self._image_width, width, 1)
        elif self.encoder_type == "residual":
            level["image_branch"] = [f"{tag}_aux_residual"]
            self.enc[level["image_branch"][0]] = ResamplingConv(self._image_width, width, 3, "down", self.taps,
                                                                fused=True)
            self._image_width = width

    def _add_output_branch(self, level: Level, index: int, width: int) -> None:
        """The finest level always reads out (norm, SiLU, 3×3 conv); with the 'skip' decoder every level does, and
        the coarser read-outs are FIR-upsampled and summed."""
        if self.decoder_type != "skip" and index != 0:
            return
        tag = f"{level['res']}x{level['res']}"
        if self.decoder_type == "skip" and index < self._coarsest:
            level["head"].append(f"{tag}_aux_up")
            self.dec[f"{tag}_aux_up"] = ResamplingConv(self.out_channels, self.out_channels, 0, "up", self.taps)
        level["head"] += [f"{tag}_aux_norm", f"{tag}_aux_conv"]
        self.dec[f"{tag}_aux_norm"] = group_norm(width, 1e-6)
        self.dec[f"{tag}_aux_conv"] = ResamplingConv(width, self.out_channels, 3)

    def _join_image(self, level: Level, x: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder_type == "skip" and level["image_branch"]:
            down, project = (self.enc[key] for key in level["image_branch"])
            image = down(image)
            return x + project(image), image
        if self.encoder_type == "residual" and level["image_branch"]:
            x = (x + self.enc[level["image_branch"][0]](image)) * math.sqrt(0.5)
            return x, x
        return x, image

    def embed(self, c_noise: torch.Tensor, labels: torch.Tensor | None,
              augment_labels: torch.Tensor | None) -> torch.Tensor:
        emb = self.map_noise(c_noise)
        if self.map_label is not None:
            # scaled by √label_dim so that a one-hot label has unit mean square per input, like the noise features
            emb = emb + self.map_label(self._labels(labels, emb) * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, features_only: bool = False) -> torch.Tensor:
        """F(x, c_noise, labels); with `features_only`, the encoder's output."""
        emb = self.embed(noise_labels, class_labels, augment_labels)
        h, saved = self.encode(x, emb)
        if features_only:
            return h
        return self.decode(h, emb, saved)[1]


# --------------------------------------------------------------------------------------------- building

ARCHITECTURES: dict[str, tuple[type[EDMUNet], dict[str, Any]]] = {
    # EDM's train.py presets (--arch); the rest of each network's arguments come from the config
    "adm": (ADMUNet, {}),
    "ddpmpp": (SongUNet, {"embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
                          "channel_mult_noise": 1, "resample_filter": [1, 1]}),
    "ncsnpp": (SongUNet, {"embedding_type": "fourier", "encoder_type": "residual", "decoder_type": "standard",
                          "channel_mult_noise": 2, "resample_filter": [1, 3, 3, 1]}),
}
_FROM_THE_DATA = {"img_resolution", "in_channels", "out_channels", "label_dim"}  # not the user's to set


def check_network_arguments(architecture: str, kwargs: dict[str, Any]) -> None:
    """Refuse arguments the network does not take, naming the ones it does."""
    network_class = ARCHITECTURES[architecture][0]
    accepted = [p for p in inspect.signature(network_class.__init__).parameters
                if p != "self" and p not in _FROM_THE_DATA]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{architecture} takes no argument {', '.join(map(repr, unknown))} "
                         f"(it takes: {', '.join(accepted)})")


def build_edm_network(architecture: str, resolution: int, channels: int, label_dim: int,
                      kwargs: dict[str, Any]) -> EDMUNet:
    """An ADM / DDPM++ / NCSN++ network; `kwargs` are the network's own arguments (as EDM records them)."""
    network_class, preset = ARCHITECTURES[architecture]
    return network_class(img_resolution=resolution, in_channels=channels, out_channels=channels,
                         label_dim=label_dim, **preset | kwargs)


# -------------------------------------------------------------------------------------------- preconditioning

VP_BETA_D, VP_BETA_MIN, VP_M = 19.9, 0.1, 1000


def vp_sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """The VP SDE time t whose marginal noise level is σ (β_d = 19.9, β_min = 0.1: EDM's Table 1)."""
    return ((VP_BETA_MIN**2 + 2 * VP_BETA_D * (1 + sigma**2).log()).sqrt() - VP_BETA_MIN) / VP_BETA_D


def precondition(kind: str, sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) of D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise), EDM's Table 1."""
    if kind == "edm":
        total = sigma**2 + sigma_data**2
        return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4
    if kind == "vp":
        return torch.ones_like(sigma), -sigma, (sigma**2 + 1).rsqrt(), (VP_M - 1) * vp_sigma_to_t(sigma)
    if kind == "ve":
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (sigma / 2).log()
    raise ValueError(f"unknown preconditioning {kind!r} (edm, vp or ve)")


class Preconditioned(nn.Module):
    """D(x; σ): any raw network F(x, c_noise, labels) wrapped in EDM, VP or VE preconditioning, in float32.
    The raw network is `model`, as in EDM's checkpoints, so their parameter names carry over unchanged."""

    def __init__(self, model: nn.Module, kind: str = "edm", sigma_data: float = 0.5):
        super().__init__()
        self.model, self.kind, self.sigma_data = model, kind, sigma_data

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None,
                features_only: bool = False) -> torch.Tensor:
        """D(x; σ); with `features_only`, the raw network's GAN features at (c_in·x, c_noise)."""
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = precondition(self.kind, sigma, self.sigma_data)
        f = self.model((c_in * x).to(x.dtype), c_noise.flatten(), labels, features_only=features_only)
        if features_only:
            return f
        return c_skip * x.float() + c_out * f.float()

    def enable_gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing = True
