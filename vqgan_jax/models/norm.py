"""Group normalisation (NHWC) with a hand-written gradient.

Statistics are float32 whatever the input dtype, and the variance is two-pass, as flax's
`GroupNorm(use_fast_variance=False)`; the gradient reuses the forward's normalised map instead of
differentiating through the two reductions.
"""

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


def _position_sums(t):
    """t: [B, N, C] -> [B, C] float32, the sum over the N positions."""
    return jnp.sum(t, axis=1, dtype=jnp.float32)


def _group_mean(t, groups: int):
    """t: [B, N, C] -> [B, 1, C]: the mean over the positions and the channels of each channel's group."""
    b, n, c = t.shape
    means = _position_sums(t).reshape(b, groups, c // groups).mean(-1) / n
    return jnp.repeat(means, c // groups, axis=1)[:, None, :]


def _normalise(x, groups, eps):
    """x: [B, N, C] float32 -> (x_hat, 1/sigma [B, 1, C])."""
    centred = x - _group_mean(x, groups)
    inv = lax.rsqrt(_group_mean(centred * centred, groups) + eps)
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
    shape, dtype = g.shape, g.dtype
    g = g.reshape(x_hat.shape).astype(jnp.float32)
    d_scale = _position_sums(g * x_hat).sum(0)
    d_bias = _position_sums(g).sum(0)
    d_hat = g * scale.astype(jnp.float32)
    dx = inv * (d_hat - _group_mean(d_hat, groups) - x_hat * _group_mean(d_hat * x_hat, groups))
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
