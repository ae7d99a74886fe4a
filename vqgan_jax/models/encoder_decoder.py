"""The VQGAN's convolutional encoder and decoder (taming's `diffusionmodules.model`), NHWC.

Module names mirror the original's `state_dict` keys (`down.0.block.1` is `down_0/block_1` here), so
that checkpoint conversion is a mechanical renaming (see `vqgan_jax.convert`).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from vqgan_jax.models.layers import AttnBlock, Downsample, MidBlock, ResnetBlock, Upsample, conv, group_norm

Dtype = Any


class Level(nn.Module):
    """One resolution level: `num_blocks` ResNet blocks (each followed by attention if `attn`), then an
    optional resampling (`"down"` or `"up"`)."""
    out_channels: int
    num_blocks: int
    attn: bool
    resample: str | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, self.dropout, self.dtype, name=f"block_{i}")(x, train)
            if self.attn:
                x = AttnBlock(self.dtype, name=f"attn_{i}")(x)
        if self.resample == "down":
            x = Downsample(self.dtype, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsample")(x)
        return x


class Encoder(nn.Module):
    """x: [B, H, W, in_channels] in [-1, 1] -> [B, H/f, W/f, z_channels (x2 if double_z)], f = 2**(len(ch_mult)-1).

    Attention sits at the levels whose nominal size (from `resolution`, not the input) is in
    `attn_resolutions`, as in the original, so a model trained at 256 runs unchanged on other sizes.
    """
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    z_channels: int
    in_channels: int = 3
    double_z: bool = False
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        num_levels = len(self.ch_mult)
        h = conv(self.ch, 3, "conv_in", self.dtype)(x)
        res = self.resolution
        for i, mult in enumerate(self.ch_mult):
            last = i == num_levels - 1
            h = Level(self.ch * mult, self.num_res_blocks, res in self.attn_resolutions,
                      None if last else "down", self.dropout, self.dtype, name=f"down_{i}")(h, train)
            res = res if last else res // 2
        h = MidBlock(self.dropout, self.dtype, name="mid")(h, train)
        h = nn.swish(group_norm("norm_out", self.dtype)(h))
        out = 2 * self.z_channels if self.double_z else self.z_channels
        return conv(out, 3, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
    """z: [B, h, w, z_channels] -> [B, h*f, w*f, out_ch], f = 2**(len(ch_mult)-1)."""
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attn_resolutions: Sequence[int]
    resolution: int
    z_channels: int
    out_ch: int = 3
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z, train: bool = False):
        num_levels = len(self.ch_mult)
        h = conv(self.ch * self.ch_mult[-1], 3, "conv_in", self.dtype)(z)
        h = MidBlock(self.dropout, self.dtype, name="mid")(h, train)
        res = self.resolution // 2 ** (num_levels - 1)
        for i in reversed(range(num_levels)):
            h = Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1, res in self.attn_resolutions,
                      "up" if i else None, self.dropout, self.dtype, name=f"up_{i}")(h, train)
            res = res * 2 if i else res
        h = nn.swish(group_norm("norm_out", self.dtype)(h))
        return conv(self.out_ch, 3, "conv_out", self.dtype)(h)

