"""The CPU-tuned convolution and group norm equal the reference ops (XLA's convolution, flax's GroupNorm)
in value and gradient; parameters keep nn.Conv's and nn.GroupNorm's names, so checkpoints carry over."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax.models.conv import Conv, conv2d
from vqgan_jax.models.norm import GroupNorm


def _lax_conv(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 9, 9, 5), 3, 1, ((1, 1), (1, 1))),      # encoder/decoder 3x3
    ((2, 10, 10, 6), 4, 2, ((1, 1), (1, 1))),    # discriminator 4x4 stride 2
    ((2, 9, 9, 6), 3, 2, ((0, 0), (0, 0))),      # downsample (padded before the conv)
    ((3, 7, 5, 4), 1, 1, ((0, 0), (0, 0))),      # 1x1, non-square map
    ((2, 8, 8, 4), 4, 1, ((1, 1), (1, 1))),      # discriminator's stride-1 layers
])
def test_conv2d_value_and_gradients_equal_xla_conv(shape, kernel, stride, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, shape[-1], 7))
    ours = lambda x, w: jnp.sum(jnp.sin(conv2d(x, w, (stride, stride), padding)))  # noqa: E731
    ref = lambda x, w: jnp.sum(jnp.sin(_lax_conv(x, w, (stride, stride), padding)))  # noqa: E731
    np.testing.assert_allclose(conv2d(x, w, (stride, stride), padding),
                               _lax_conv(x, w, (stride, stride), padding), rtol=1e-6)
    for g, g_ref in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_allclose(g, g_ref, atol=1e-5 * float(jnp.abs(g_ref).max()))


def test_conv_module_has_nn_conv_parameters():
    x = jnp.ones((1, 8, 8, 3))
    ours = Conv(5, 3, padding=((1, 1), (1, 1))).init(jax.random.PRNGKey(0), x)
    ref = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1))).init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref)
    np.testing.assert_array_equal(ours["params"]["kernel"], ref["params"]["kernel"])


@pytest.mark.parametrize("shape", [(2, 8, 8, 64), (3, 5, 7, 32)])
def test_group_norm_value_and_gradients_equal_flax(shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3 + 1
    ref = nn.GroupNorm(32, epsilon=1e-6, use_fast_variance=False)
    params = ref.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, GroupNorm(32, 1e-6).init(jax.random.PRNGKey(1), x)) == \
        jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * jnp.cos(x))  # noqa: E731
    np.testing.assert_allclose(GroupNorm(32, 1e-6).apply(params, x), ref.apply(params, x), atol=1e-5)
    ours_g = jax.tree.leaves(jax.grad(loss(GroupNorm(32, 1e-6)), (0, 1))(params, x))
    ref_g = jax.tree.leaves(jax.grad(loss(ref), (0, 1))(params, x))
    for g, g_ref in zip(ours_g, ref_g):
        np.testing.assert_allclose(g, g_ref, atol=1e-5 * float(jnp.abs(g_ref).max()))


def test_group_norm_keeps_bfloat16_and_rejects_uneven_groups():
    x = jnp.ones((1, 4, 4, 32), jnp.bfloat16)
    norm = GroupNorm(32, 1e-6, jnp.bfloat16)
    params = norm.init(jax.random.PRNGKey(0), x)
    assert norm.apply(params, x).dtype == jnp.bfloat16
    assert jax.grad(lambda x: jnp.sum(norm.apply(params, x).astype(jnp.float32)))(x).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="48 channels do not split into 32 groups"):
        norm.init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 48)))
