"""The denoiser: an ADM-style U-Net (Dhariwal & Nichol 2021) predicting pixel-space eps.

Residual blocks with GroupNorm and scale-shift timestep conditioning, multi-head
self-attention through ``F.scaled_dot_product_attention`` at chosen resolutions,
strided-conv downsampling, nearest + conv upsampling, and skip connections from
every block of the encoder to the decoder. ``model(x, t)``: x (B, C, H, W) floating, t
the integer steps (B,) or one int for the whole batch.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .checks import check_bool, check_int, check_number, is_int

__all__ = ["UNet", "PRESETS", "timestep_embedding", "check_resolution", "AUTOCAST_LAYERS",
           "upgrade_config",
           "cast_for_autocast_"]

# Named configurations: paper64 is the model of Lee et al. (121.06 M parameters at 64 x 64;
# the count changes with the sides that get attention); small (5.59 M at 64 x 64, 5.44 M at
# 32 x 32) is for CPU runs.
PRESETS = {
    "paper64": dict(base_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                    attention_resolutions=(16, 8), num_heads=4, dropout=0.0),
    "small": dict(base_channels=32, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                  attention_resolutions=(8,), num_heads=4, dropout=0.0),
}

_GROUPS = 32

# The layers whose parameters autocast casts to its low precision (bfloat16 here): the
# convolutions and linear layers. The norms' parameters stay float32 under autocast.
AUTOCAST_LAYERS = (nn.Conv2d, nn.Linear)


def cast_for_autocast_(model: nn.Module, dtype=torch.bfloat16) -> nn.Module:
    """Casts the parameters of ``model``'s :data:`AUTOCAST_LAYERS` to ``dtype`` in place
    and returns ``model``. Under autocast to ``dtype`` it then computes the same numbers
    as before, without casting those weights at every call (inside a CUDA graph, where
    autocast's cache is off, one kernel per weight per call). For inference: the float32
    weights are gone."""
    for m in model.modules():
        if isinstance(m, AUTOCAST_LAYERS):
            m.to(dtype)
    return model


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B, dim) sinusoidal embedding of the steps t (B,) (a real tensor): [cos(t w_k),
    sin(t w_k)], w_k = max_period^(-k / (dim/2)); ``dim`` >= 1, ``max_period`` > 0."""
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_complex \
            or t.dtype == torch.bool:
        raise TypeError(f"t: expected a real tensor of shape (B,), got "
                        f"{getattr(t, 'dtype', type(t).__name__)} "
                        f"{tuple(getattr(t, 'shape', ()))}")
    dim = check_int("dim", dim)
    check_number("max_period", max_period, 0, lo_open=True)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then GroupNorm scaled and shifted by the timestep
    embedding, SiLU, dropout, zero-initialized conv; 1x1 conv on the skip when the
    channel count changes."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_GROUPS, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_GROUPS, cout)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialized output."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        if ch % heads:
            raise ValueError(f"num_heads: {heads} does not divide the {ch} channels")
        self.heads = heads
        self.norm = nn.GroupNorm(_GROUPS, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        qkv = qkv.transpose(-1, -2)                        # q, k, v: (B, heads, HW, c/heads)
        # The fused attention kernels (flash, memory-efficient) need the last dimension
        # dense, and SDPA silently falls back to its unfused math otherwise; dense already
        # when x is channels_last.
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        q, k, v = qkv.unbind(1)
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(o.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """A ResBlock, optionally followed by attention."""

    def __init__(self, cin, cout, emb_dim, dropout, attn, heads):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, dropout)
        self.attn = Attention(cout, heads) if attn else None

    def forward(self, x, emb):
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


def _level_call(layer: _Level, emb, *xs):
    """``layer`` on the channel concatenation of ``xs`` (a decoder level's input and its
    skip; one tensor in the encoder and the middle)."""
    return layer(xs[0] if len(xs) == 1 else torch.cat(xs, dim=1), emb)


def check_resolution(resolution, channel_mult: Sequence[int], name: str = "resolution") -> int:
    """``resolution`` when a U-Net with levels ``channel_mult`` takes it: an int >= 1 that
    each level but the last halves, so divisible by 2^(levels-1); else ValueError naming
    ``name``."""
    resolution = check_int(name, resolution)
    levels = len(channel_mult)
    if resolution % 2 ** (levels - 1):
        raise ValueError(f"{name}: {resolution} is not divisible by 2^{levels - 1} "
                         f"({levels} levels)")
    return resolution


def upgrade_config(config: dict) -> dict:
    """A stored model config (``UNet.config``) as this version builds it: one saved
    before ``emb_act`` existed is a model without it (``emb_act=False``). Other values,
    and anything that is not a dict, are returned as they are."""
    if isinstance(config, dict) and "emb_act" not in config:
        return {**config, "emb_act": False}
    return config


class UNet(nn.Module):
    """ADM-style U-Net: eps_theta(x_t, t).

    ``resolution``: input side (square, divisible by 2^(levels-1)); ``channels``:
    image channels; ``channel_mult``: width of each level in units of
    ``base_channels``; ``attention_resolutions``: feature-map sides that get
    self-attention; ``freq_input``: also feed ``dct2(x_t)`` as extra input channels
    (the paper code's ``freq_feat``); ``emb_act``: SiLU on the timestep embedding before
    each block's scale-shift Linear, as ADM (False: the model of checkpoints saved before
    this option, whose two Linears met with nothing between them; :func:`upgrade_config`).
    ``UNet(**model.config)`` rebuilds the model.

    :attr:`activation_checkpointing` (off when built; not part of ``config``, since it
    changes no number) trades compute for memory in training.
    """

    def __init__(self, resolution: int = 64, channels: int = 3, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 3, 4), num_res_blocks: int = 3,
                 attention_resolutions: Sequence[int] = (16, 8), num_heads: int = 4,
                 dropout: float = 0.0, freq_input: bool = False, emb_act: bool = True):
        super().__init__()
        channels = check_int("channels", channels)
        base_channels = check_int("base_channels", base_channels)
        num_res_blocks = check_int("num_res_blocks", num_res_blocks)
        num_heads = check_int("num_heads", num_heads)
        if base_channels % _GROUPS:
            raise ValueError(f"base_channels: expected a multiple of {_GROUPS}, "
                             f"got {base_channels}")
        for name, v in (("channel_mult", channel_mult),
                        ("attention_resolutions", attention_resolutions)):
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                raise TypeError(f"{name}: expected a sequence of ints, got {v!r}")
        channel_mult = tuple(channel_mult)
        if not channel_mult:
            raise ValueError("channel_mult: expected at least one level")
        channel_mult = tuple(check_int("channel_mult", m) for m in channel_mult)
        attention_resolutions = tuple(check_int("attention_resolutions", r)
                                      for r in attention_resolutions)
        resolution = check_resolution(resolution, channel_mult)
        # a Python number (numpy's floats taken too): it goes into the JSON config
        dropout = float(check_number("dropout", dropout, lo=0, hi=1, hi_open=True))
        check_bool("freq_input", freq_input)
        check_bool("emb_act", emb_act)
        self.config = dict(resolution=resolution, channels=channels, base_channels=base_channels,
                           channel_mult=list(channel_mult), num_res_blocks=num_res_blocks,
                           attention_resolutions=list(attention_resolutions),
                           num_heads=num_heads, dropout=dropout, freq_input=freq_input,
                           emb_act=emb_act)
        self.resolution, self.channels, self.freq_input = resolution, channels, freq_input
        self.emb_act = emb_act
        self.base_channels = base_channels
        emb_dim = 4 * base_channels
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))
        cin = channels * (2 if freq_input else 1)
        self.input = nn.Conv2d(cin, base_channels, 3, padding=1)

        ch, res = base_channels, resolution
        skips = [ch]
        self.down = nn.ModuleList()
        for i, m in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(_Level(ch, m * base_channels, emb_dim, dropout,
                                        res in attention_resolutions, num_heads))
                ch = m * base_channels
                skips.append(ch)
            if i < len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                res //= 2
                skips.append(ch)
        sides = [resolution // 2 ** i for i in range(len(channel_mult))]
        unused = sorted(set(attention_resolutions) - set(sides), reverse=True)
        if unused:
            warnings.warn(f"attention_resolutions: {unused} match none of the feature-map "
                          f"sides {sides}, so those get no attention (add levels to "
                          f"channel_mult to reach them)", stacklevel=2)
        self.mid = nn.ModuleList([_Level(ch, ch, emb_dim, dropout, True, num_heads),
                                  _Level(ch, ch, emb_dim, dropout, False, num_heads)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(channel_mult))):
            for j in range(num_res_blocks + 1):
                self.up.append(_Level(ch + skips.pop(), m * base_channels, emb_dim, dropout,
                                      res in attention_resolutions, num_heads))
                ch = m * base_channels
            if i > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(_GROUPS, ch), nn.SiLU(),
                                 _zero(nn.Conv2d(ch, channels, 3, padding=1)))
        self._checkpointing = False

    @property
    def activation_checkpointing(self) -> bool:
        """When True, a forward in training mode with gradients enabled (outside
        torch.func.grad, vjp and jacrev, which refuse its hooks) keeps only each
        residual level's input (and its skip) for the backward, which runs the level's
        forward again to get the rest (``torch.utils.checkpoint``, non-reentrant): the
        activations of the residual and attention blocks, most of a step's memory, are
        not held between forward and backward, for about one more forward's compute. The
        gradients are the same numbers (bit for bit on a CPU, uncompiled; dropout masks
        are replayed from the saved random state)."""
        return self._checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool) -> None:
        self._checkpointing = check_bool("activation_checkpointing", on)

    def _level(self, layer: _Level, emb, *xs):
        # Not where saved-tensor hooks are off (the query: what torch's own
        # disable_saved_tensors_hooks reads): torch.func.grad, vjp and jacrev refuse them.
        # Under torch.compile they are on, and dynamo cannot trace the query.
        if self._checkpointing and self.training and torch.is_grad_enabled() and (
                torch.compiler.is_compiling()
                or torch._C._autograd._saved_tensors_hooks_get_disabled_error_message()
                is None):
            # The random state is saved (and restored for the recomputation) only where a
            # dropout draws from it: a CUDA graph capture may refuse to read it.
            return checkpoint(_level_call, layer, emb, *xs, use_reentrant=False,
                              preserve_rng_state=layer.res.dropout.p > 0)
        return _level_call(layer, emb, *xs)

    @classmethod
    def from_preset(cls, name: str, resolution: int = 64, channels: int = 3, **overrides):
        """A named configuration (``PRESETS``), any of its entries replaced by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        unknown = set(overrides) - set(PRESETS[name]) - {"freq_input", "emb_act"}
        if unknown:
            raise TypeError(f"overrides: unknown UNet arguments {sorted(unknown)}")
        return cls(resolution=resolution, channels=channels, **{**PRESETS[name], **overrides})

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """eps_theta of ``x`` (B, C, H, W), a floating tensor, at steps ``t``: an integer
        tensor (B,) on x's device, or one int >= 0 for the whole batch. Type, dtype and
        shape checks only (no host synchronization: the model runs in CUDA graphs and
        under torch.compile); a tensor t's values are not checked."""
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError(f"x: expected a floating-point tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if is_int(t) or isinstance(t, bool):     # a bool: check_int names it
            t = torch.full((x.shape[0],), check_int("t", t, 0), dtype=torch.int64,
                           device=x.device)
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex \
                or t.dtype == torch.bool:
            raise TypeError(f"t: expected an integer tensor or an int, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.channels, self.resolution, self.resolution):
            raise ValueError(f"x: expected shape (B, {self.channels}, {self.resolution}, "
                             f"{self.resolution}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape ({x.shape[0]},), got {tuple(t.shape)}")
        emb = self.time_embed(timestep_embedding(t, self.base_channels).to(x.dtype))
        if self.emb_act:      # ADM's SiLU before each block's Linear, applied once here
            emb = F.silu(emb)
        if self.freq_input:
            x = torch.cat([x, ops.dct2(x)], dim=1)
        h = self.input(x)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Downsample) else self._level(layer, emb, h)
            hs.append(h)
        for layer in self.mid:
            h = self._level(layer, emb, h)
        for layer in self.up:
            h = layer(h) if isinstance(layer, Upsample) else self._level(layer, emb, h, hs.pop())
        return self.out(h)
