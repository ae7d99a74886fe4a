"""Building blocks shared by the encoder and decoder (NHWC)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from vqgan_jax.models.conv import Conv
from vqgan_jax.models.norm import GroupNorm

Dtype = Any


def conv(features: int, kernel: int, name: str, dtype: Dtype = jnp.float32,
         stride: int = 1, padding: Any = None) -> Conv:
    """A square convolution; by default padded by `kernel // 2` on every side, as PyTorch's `padding=k//2`."""
    if padding is None:
        padding = [(kernel // 2, kernel // 2)] * 2
    return Conv(features, kernel, strides=stride, padding=padding, dtype=dtype, name=name)


def group_norm(name: str, dtype: Dtype = jnp.float32) -> GroupNorm:
    # 32 groups, eps 1e-6 as the original; the two-pass variance matches PyTorch to float precision.
    return GroupNorm(num_groups=32, epsilon=1e-6, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, plus a 1x1 `nin_shortcut` where the channel count changes."""
    out_channels: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.swish(group_norm("norm1", self.dtype)(x))
        h = conv(self.out_channels, 3, "conv1", self.dtype)(h)
        h = nn.swish(group_norm("norm2", self.dtype)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "nin_shortcut", self.dtype)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, scaled by C**-0.5."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = group_norm("norm", self.dtype)(x)
        q, k, v = (conv(c, 1, name, self.dtype)(y).reshape(b, h * w, c) for name in ("q", "k", "v"))
        weights = nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * (c ** -0.5), axis=-1)
        y = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c)
        return x + conv(c, 1, "proj_out", self.dtype)(y)


class Downsample(nn.Module):
    """Halves H and W: zero pad right and bottom by one, then a 3x3 stride-2 VALID conv (as the original)."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(x.shape[-1], 3, "conv", self.dtype, stride=2, padding=((0, 0), (0, 0)))(x)


class Upsample(nn.Module):
    """Doubles H and W: nearest-neighbour repeat, then a 3x3 conv."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], 3, "conv", self.dtype)(x)


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution."""
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = ResnetBlock(c, self.dropout, self.dtype, name="block_1")(x, train)
        x = AttnBlock(self.dtype, name="attn_1")(x)
        return ResnetBlock(c, self.dropout, self.dtype, name="block_2")(x, train)
