"""The networks of EDM's released checkpoints, written for this project: ADM (Dhariwal & Nichol 2021, EDM's
ImageNet-64 network) and Song et al.'s DDPM++ / NCSN++ (EDM's CIFAR-10 networks).

Parameter names and shapes follow EDM's checkpoints exactly (`tests/data/edm_manifests/`), so converted weights
load strictly: a `model` module holding `map_*` embedding layers and two ordered dicts of blocks, `enc` and `dec`,
whose keys name the resolution (`64x64_block0`, `8x8_in0`, …). Dropout is kept configurable but distillation sets
it to 0, as DMD2 does.

`features_only=True` returns the encoder's output — before the two lowest-resolution "in0/in1" blocks, which sit
at the head of `dec` — where the original DMD2 attaches the diffusion-GAN head for EDM networks (768×8×8 for
ImageNet-64 ADM).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# ------------------------------------------------------------------------------------------------ layers


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """EDM's rule: 32 groups, but at least 4 channels per group."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


class Conv(nn.Module):
    """A 2-D convolution (kernel 0 = no weights) with optional 2× up- or down-sampling by a separable FIR filter.

    The filter is a buffer (`resample_filter`, part of the checkpoint) only when the layer resamples; `fused`
    orders resampling and convolution as EDM's NCSN++ residual encoder does (convolve first when going down).
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, bias: bool = True, up: bool = False, down: bool = False,
                 resample_filter: tuple[int, ...] = (1, 1), fused: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down, self.fused = c_in, c_out, up, down, fused
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(c_out)) if kernel and bias else None
        if self.weight is not None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", (f.outer(f) / f.sum() ** 2)[None, None] if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, f = self.weight, self.resample_filter
        w = w.to(x.dtype) if w is not None else None
        f = f.to(x.dtype) if f is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused and self.up and w is not None:
            x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2,
                                   padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, (f * 4).tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2,
                                       padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


def zero_init(module: nn.Module, scale: float = 0.0) -> nn.Module:
    """Output layers start at (or near) zero, so every residual branch starts as the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)
    return module


class UNetBlock(nn.Module):
    """GroupNorm → SiLU → conv (± resample), noise-embedding modulation, GroupNorm → SiLU → dropout → conv, a
    (projected) skip, then optional multi-head self-attention. Both residual sums are scaled by `skip_scale`."""

    def __init__(self, c_in: int, c_out: int, emb_channels: int, *, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: tuple[int, ...] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = c_in, c_out
        self.num_heads = (num_heads or c_out // channels_per_head) if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = group_norm(c_in, eps)
        self.conv0 = Conv(c_in, c_out, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = nn.Linear(emb_channels, c_out * (2 if adaptive_scale else 1))
        self.norm1 = group_norm(c_out, eps)
        self.conv1 = zero_init(Conv(c_out, c_out, 3))
        self.skip = None
        if c_out != c_in or up or down:
            kernel = 1 if resample_proj or c_out != c_in else 0
            self.skip = Conv(c_in, c_out, kernel, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = group_norm(c_out, eps)
            self.qkv = Conv(c_out, c_out * 3, 1)
            self.proj = zero_init(Conv(c_out, c_out, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            n, c, h, w = x.shape
            # EDM's layout: channels split per head first, then q/k/v interleaved within each head
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            weights = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(q.shape[1])).softmax(dim=2)
            attended = torch.einsum("nqk,nck->ncq", weights.to(v.dtype), v)
            x = (self.proj(attended.reshape(n, c, h, w)) + x) * self.skip_scale
        return x


def positional_embedding(x: torch.Tensor, channels: int, endpoint: bool = False, max_positions: int = 10000) -> torch.Tensor:
    """Transformer-style sinusoids of a scalar per sample: [cos, sin] over geometric frequencies."""
    half = channels // 2
    freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if endpoint else 0))
    freqs = (1 / max_positions) ** freqs
    args = x.float().outer(freqs)
    return torch.cat([args.cos(), args.sin()], dim=1)


class FourierFeatures(nn.Module):
    """Random Fourier features of a scalar (NCSN++): fixed frequencies stored in the checkpoint."""

    def __init__(self, channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = x.float().outer(2 * math.pi * self.freqs)
        return torch.cat([args.cos(), args.sin()], dim=1)


# ---------------------------------------------------------------------------------------------- networks


class _EDMNetwork(nn.Module):
    """What ADM and DDPM++/NCSN++ share: run `enc` collecting skips, optionally stop there, run `dec`."""

    gradient_checkpointing = False

    def _block(self, block: nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if not isinstance(block, UNetBlock):
            return block(x)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, emb, use_reentrant=False)
        return block(x, emb)

    def _level_head(self, res: int, c: int, lowest: bool, block: dict[str, Any]) -> None:
        """What opens a decoder level: the two "in0/in1" blocks at the lowest resolution (in0 with attention),
        a 2x upsampling block everywhere else."""
        if lowest:
            self.dec[f"{res}x{res}_in0"] = UNetBlock(c, c, attention=True, **block)
            self.dec[f"{res}x{res}_in1"] = UNetBlock(c, c, **block)
        else:
            self.dec[f"{res}x{res}_up"] = UNetBlock(c, c, up=True, **block)

    def _label(self, labels: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        if labels is None:  # no labels given: the all-zero vector, the branch label dropout trains
            labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
        labels = labels.float()
        if self.training and self.label_dropout:
            labels = labels * (torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout).float()
        return labels


class ADMUNet(_EDMNetwork):
    """ADM as EDM configures it for ImageNet-64 (`model_channels` 192, `channel_mult` [1, 2, 3, 4], 3 blocks per
    resolution, attention at 32, 16 and 8 px: 296M parameters)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: tuple[int, ...] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: tuple[int, ...] = (32, 16, 8),
                 dropout: float = 0.0, label_dropout: float = 0.0):
        super().__init__()
        self.label_dim, self.label_dropout, self.model_channels = label_dim, label_dropout, model_channels
        emb = model_channels * channel_mult_emb
        block = dict(emb_channels=emb, channels_per_head=64, dropout=dropout)
        self.map_augment = zero_init(nn.Linear(augment_dim, model_channels, bias=False)) if augment_dim else None
        self.map_layer0 = nn.Linear(model_channels, emb)
        self.map_layer1 = nn.Linear(emb, emb)
        self.map_label = nn.Linear(label_dim, emb, bias=False) if label_dim else None

        self.enc, c = nn.ModuleDict(), in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv(c, model_channels * mult, 3)
                c = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c, c, down=True, **block)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(c, model_channels * mult, attention=res in attn_resolutions, **block)
                c = model_channels * mult
        skips = [b.out_channels for b in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            self._level_head(res, c, level == len(channel_mult) - 1, block)
            for i in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(c + skips.pop(), model_channels * mult,
                                                             attention=res in attn_resolutions, **block)
                c = model_channels * mult
        self.out_norm = group_norm(c)
        self.out_conv = zero_init(Conv(c, out_channels, 3))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, features_only: bool = False) -> torch.Tensor:
        emb = positional_embedding(noise_labels, self.model_channels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(self._label(class_labels, x))
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = self._block(block, x, emb)
            skips.append(x)
        if features_only:
            return x
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = self._block(block, x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class SongUNet(_EDMNetwork):
    """DDPM++ (`embedding_type` positional, standard encoder) and NCSN++ (fourier, residual encoder) as EDM
    configures them for CIFAR-10 (`model_channels` 128, `channel_mult` [2, 2, 2], 4 blocks, attention at 16 px:
    56M parameters)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: tuple[int, ...] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: tuple[int, ...] = (16,),
                 dropout: float = 0.0, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: tuple[int, ...] = (1, 1)):
        super().__init__()
        if embedding_type not in ("positional", "fourier") or encoder_type not in ("standard", "skip", "residual") \
                or decoder_type not in ("standard", "skip"):
            raise ValueError(f"unknown SongUNet variant: embedding {embedding_type!r}, encoder {encoder_type!r}, "
                             f"decoder {decoder_type!r}")
        self.label_dim, self.label_dropout, self.embedding_type = label_dim, label_dropout, embedding_type
        emb, noise = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        self.noise_channels = noise
        rf = tuple(resample_filter)
        block = dict(emb_channels=emb, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=rf, resample_proj=True, adaptive_scale=False)
        self.map_noise = FourierFeatures(noise) if embedding_type == "fourier" else None
        self.map_label = nn.Linear(label_dim, noise) if label_dim else None
        self.map_augment = nn.Linear(augment_dim, noise, bias=False) if augment_dim else None
        self.map_layer0 = nn.Linear(noise, emb)
        self.map_layer1 = nn.Linear(emb, emb)

        self.enc, c, c_aux = nn.ModuleDict(), in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv(c, model_channels, 3)
                c = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c, c, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv(c_aux, c_aux, 0, down=True, resample_filter=rf)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv(c_aux, c, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv(c_aux, c, 3, down=True, resample_filter=rf, fused=True)
                    c_aux = c
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(c, model_channels * mult, attention=res in attn_resolutions, **block)
                c = model_channels * mult
        skips = [b.out_channels for name, b in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            self._level_head(res, c, level == len(channel_mult) - 1, block)
            for i in range(num_blocks + 1):
                attention = i == num_blocks and res in attn_resolutions  # only after the last block of a level
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(c + skips.pop(), model_channels * mult, attention=attention, **block)
                c = model_channels * mult
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv(out_channels, out_channels, 0, up=True, resample_filter=rf)
                self.dec[f"{res}x{res}_aux_norm"] = group_norm(c, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = zero_init(Conv(c, out_channels, 3), 1e-5)

    def _noise_embedding(self, noise_labels: torch.Tensor) -> torch.Tensor:
        if self.map_noise is not None:
            emb = self.map_noise(noise_labels)
        else:
            emb = positional_embedding(noise_labels, self.noise_channels, endpoint=True)
        return emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [sin, cos], as DDPM++ was trained

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None, features_only: bool = False) -> torch.Tensor:
        emb = self._noise_embedding(noise_labels)
        if self.map_label is not None:
            emb = emb + self.map_label(self._label(class_labels, x) * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = self._block(block, x, emb)
                skips.append(x)
        if features_only:
            return x

        aux, normed = None, None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                normed = block(x)
            elif "aux_conv" in name:
                out = block(F.silu(normed))
                aux = out if aux is None else out + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = self._block(block, x, emb)
        return aux


ARCHITECTURES: dict[str, tuple[type[_EDMNetwork], dict[str, Any]]] = {
    # EDM's train.py presets (--arch); the rest of each network's arguments come from the config
    "adm": (ADMUNet, {}),
    "ddpmpp": (SongUNet, dict(embedding_type="positional", encoder_type="standard", decoder_type="standard",
                              channel_mult_noise=1, resample_filter=[1, 1])),
    "ncsnpp": (SongUNet, dict(embedding_type="fourier", encoder_type="residual", decoder_type="standard",
                              channel_mult_noise=2, resample_filter=[1, 3, 3, 1])),
}


_GIVEN = {"img_resolution", "in_channels", "out_channels", "label_dim"}  # set from the data, not by the user


def check_network_arguments(architecture: str, kwargs: dict[str, Any]) -> None:
    """Refuse arguments the network does not take, naming the ones it does."""
    import inspect

    cls, _ = ARCHITECTURES[architecture]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and p not in _GIVEN]
    unknown = [k for k in kwargs if k not in allowed]
    if unknown:
        raise ValueError(f"{architecture} takes no argument {', '.join(map(repr, unknown))} "
                         f"(it takes: {', '.join(allowed)})")


def build_edm_network(architecture: str, resolution: int, channels: int, label_dim: int,
                      kwargs: dict[str, Any]) -> _EDMNetwork:
    """An ADM / DDPM++ / NCSN++ network; `kwargs` are the network's own arguments (as EDM records them)."""
    cls, preset = ARCHITECTURES[architecture]
    return cls(img_resolution=resolution, in_channels=channels, out_channels=channels, label_dim=label_dim,
               **{**preset, **kwargs})


# -------------------------------------------------------------------------------------------- preconditioning

VP_BETA_D, VP_BETA_MIN, VP_M = 19.9, 0.1, 1000


def vp_sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """The VP SDE time t whose marginal noise level is σ (EDM's VPPrecond, β_d = 19.9, β_min = 0.1)."""
    return ((VP_BETA_MIN**2 + 2 * VP_BETA_D * (1 + sigma**2).log()).sqrt() - VP_BETA_MIN) / VP_BETA_D


def precondition(kind: str, sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) of D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise) for EDM's three schemes."""
    if kind == "edm":
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        return (c_skip, sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt(),
                1 / (sigma**2 + sigma_data**2).sqrt(), sigma.log() / 4)
    if kind == "vp":
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (VP_M - 1) * vp_sigma_to_t(sigma)
    if kind == "ve":
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()
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
