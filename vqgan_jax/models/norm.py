"""Group normalisation (NHWC) and layer normalisation with hand-written gradients; PyTorch's batch norm.

Statistics are float32 whatever the input dtype, and the variance is two-pass, as flax's
`GroupNorm(use_fast_variance=False)`; the gradient reuses the forward's normalised map instead of
differentiating through the reductions, and needs only two of them (sums over positions of g and of
g * x_hat).

Every statistic reaches the big elementwise passes as one value per image and channel ([B, 1, C]), made by
a product with a [C, C] group-averaging matrix. Written as a reshape to groups and a repeat back to
channels, XLA:CPU fuses the repeat into each pass over the map, and the per-element channel -> group
index breaks vectorisation: forward + backward on [4, 64, 64, 128] took 28 ms, 12 ms this way.
"""

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from vqgan_jax.models.conv import column_sum

Dtype = Any


def _position_sums(t):
    """t: [B, N, C] -> [B, C] float32, the sum over the N positions."""
    return jnp.sum(t, axis=1, dtype=jnp.float32)


def _group_mean(sums, positions: int, groups: int):
    """sums: [B, C] per-channel sums over `positions` positions -> [B, 1, C]: for each channel, the mean
    over the positions and the channels of its group."""
    c = sums.shape[-1]
    group = jnp.arange(c) // (c // groups)
    averaging = (group[:, None] == group[None, :]).astype(jnp.float32) / (positions * (c // groups))
    # HIGHEST: a GPU or TPU would otherwise take these means in reduced precision.
    return jnp.dot(sums, averaging, precision=lax.Precision.HIGHEST)[:, None, :]


def _normalise(x, groups, eps):
    """x: [B, N, C] float32 -> (x_hat, 1/sigma [B, 1, C])."""
    n = x.shape[1]
    centred = x - _group_mean(_position_sums(x), n, groups)
    inv = lax.rsqrt(_group_mean(_position_sums(centred * centred), n, groups) + eps)
    return centred * inv, inv


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x, scale, bias, groups: int, eps: float):
    """x: [B, H, W, C]; scale, bias: [C] -> [B, H, W, C] in x's dtype."""
    return _group_norm_fwd(x, scale, bias, groups, eps)[0]


def _group_norm_fwd(x, scale, bias, groups, eps):
    x_hat, inv = _normalise(x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.float32), groups, eps)
    y = x_hat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.reshape(x.shape).astype(x.dtype), (x_hat, inv, scale)


def _group_norm_bwd(groups, eps, residuals, g):
    x_hat, inv, scale = residuals
    shape, dtype, n = g.shape, g.dtype, x_hat.shape[1]
    g = g.reshape(x_hat.shape).astype(jnp.float32)
    scale32 = scale.astype(jnp.float32)
    sum_g, sum_g_hat = _position_sums(g), _position_sums(g * x_hat)  # [B, C] each
    # dx = inv * (d_hat - mean(d_hat) - x_hat * mean(d_hat * x_hat)), d_hat = g * scale
    mean_d = _group_mean(sum_g * scale32, n, groups)
    mean_d_hat = _group_mean(sum_g_hat * scale32, n, groups)
    dx = inv * (g * scale32 - mean_d - x_hat * mean_d_hat)
    # Summed over images as a product: XLA would fold a sum of the sums into a second reduction over
    # the whole map, a slow one on CPU (batch and positions together).
    d_scale, d_bias = jnp.einsum("b,kbc->kc", jnp.ones(g.shape[0]), jnp.stack([sum_g_hat, sum_g]),
                                 precision=lax.Precision.HIGHEST)
    return dx.reshape(shape).astype(dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """`nn.GroupNorm(num_groups, epsilon, use_fast_variance=False)` on `group_norm`: same parameters
    (scale, bias) and initialisers; the output is in `dtype`."""
    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return group_norm(x.astype(self.dtype), scale, bias, self.num_groups, self.epsilon)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """x: [..., C]; scale, bias: [C] -> [..., C] in x's dtype, normalised over C (two-pass variance)."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    centred = rows - jnp.mean(rows, axis=-1, keepdims=True)
    inv = lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    x_hat = centred * inv
    y = x_hat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.reshape(x.shape).astype(x.dtype), (x_hat, inv, scale)


def _layer_norm_bwd(eps, residuals, g):
    x_hat, inv, scale = residuals
    shape, dtype = g.shape, g.dtype
    g = g.reshape(x_hat.shape).astype(jnp.float32)
    d_hat = g * scale.astype(jnp.float32)
    # dx = inv * (d_hat - mean_C(d_hat) - x_hat * mean_C(d_hat * x_hat))
    dx = inv * (d_hat - jnp.mean(d_hat, axis=-1, keepdims=True)
                - x_hat * jnp.mean(d_hat * x_hat, axis=-1, keepdims=True))
    d_scale, d_bias = column_sum(g * x_hat), column_sum(g)
    return dx.reshape(shape).astype(dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """`nn.LayerNorm(epsilon, use_fast_variance=False)` on `layer_norm`: same parameters (scale, bias) and
    initialisers, statistics in float32; the output is in `dtype`."""
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        return layer_norm(x.astype(self.dtype), scale, bias, self.epsilon)


class BatchNorm(nn.Module):
    """PyTorch's BatchNorm2d over x: [..., C] (NHWC), with flax's `nn.BatchNorm` variables (params scale,
    bias; batch_stats mean, var). As PyTorch, and unlike flax, the running variance is updated with the
    batch's unbiased variance (n / (n - 1)) while the batch is normalised with the biased one. train:
    normalise with the batch's statistics and update the running ones (apply with
    `mutable=["batch_stats"]`); otherwise use the running ones."""
    momentum: float = 0.1  # PyTorch's convention: the weight of the new batch
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        if train:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)
            mean = jnp.mean(xf, axes)
            var = jnp.mean(jnp.square(xf - mean), axes)  # two-pass, as flax's use_fast_variance=False
            if not self.is_initializing():
                n = x.size // c
                m = self.momentum
                running_mean.value = (1 - m) * running_mean.value + m * mean
                running_var.value = (1 - m) * running_var.value + m * var * (n / max(n - 1, 1))
        else:
            mean, var = running_mean.value, running_var.value
        y = (x.astype(jnp.float32) - mean) * (scale * lax.rsqrt(var + self.epsilon)) + bias
        return y.astype(self.dtype)
