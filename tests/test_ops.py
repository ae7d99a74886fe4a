"""Our convolution, group norm, layer norm and the GPT's Dense equal flax's nn.Conv, nn.GroupNorm,
nn.LayerNorm and nn.Dense in value and gradient, with the same parameter names, so checkpoints carry over;
our batch norm is PyTorch's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax.models.conv import Conv, _kernel_grad_strips, _strips, conv2d_given_dx_kernel, flip_transpose
from vqgan_jax.models.gpt import Dense
from vqgan_jax.models.norm import GroupNorm, LayerNorm


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((2, 9, 9, 5), 3, 1, ((1, 1), (1, 1))),      # encoder/decoder 3x3
    ((2, 10, 10, 6), 4, 2, ((1, 1), (1, 1))),    # discriminator 4x4 stride 2
    ((2, 9, 9, 6), 3, 2, ((0, 0), (0, 1))),      # downsample (padded right/bottom only)
    ((3, 7, 5, 4), 1, 1, ((0, 0), (0, 0))),      # 1x1, non-square map
])
def test_conv_equals_nn_conv_in_value_and_gradients(shape, kernel, stride, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    ours = Conv(7, kernel, stride, padding)
    ref = nn.Conv(7, (kernel, kernel), (stride, stride), padding)
    params = jax.tree.map(lambda a: a + 0.1, ours.init(jax.random.PRNGKey(1), x))  # nonzero bias
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-6)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
    for g, g_ref in zip(jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x)),
                        jax.tree.leaves(jax.grad(loss(ref), (0, 1))(params, x))):
        np.testing.assert_allclose(g, g_ref, atol=1e-5 * float(jnp.abs(g_ref).max()))


@pytest.mark.parametrize("batch, rows, strips", [(4, 64, 4), (8, 32, 2), (16, 8, 1), (1, 9, 9), (3, 10, 10), (2, 5, 5)])
def test_strip_count(batch, rows, strips):
    assert _strips(batch, rows) == strips


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((1, 16, 12, 3), 3, 1, ((1, 1), (1, 1))),
    ((2, 16, 16, 4), 4, 2, ((1, 2), (1, 2))),    # discriminator-style, uneven padding
    ((4, 12, 8, 5), 1, 1, ((0, 0), (0, 0))),
    ((1, 17, 9, 2), 3, 2, ((0, 1), (0, 1))),     # downsample: rows the last strip never reads
])
def test_kernel_gradient_over_strips_equals_xla(shape, kernel, stride, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, shape[-1], 6))
    conv = lambda w: jax.lax.conv_general_dilated(x, w, (stride, stride), padding,  # noqa: E731
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y, pullback = jax.vjp(conv, w)
    g = jax.random.normal(jax.random.PRNGKey(2), y.shape)
    assert _strips(shape[0], y.shape[1]) > 1
    ours = _kernel_grad_strips(x, w, g, (stride, stride), padding)
    np.testing.assert_allclose(ours, pullback(g)[0], atol=1e-5 * float(jnp.abs(ours).max()))


@pytest.mark.parametrize("kernel, padding", [(3, ((1, 1), (1, 1))), (3, ((0, 2), (2, 1))), (1, ((0, 0), (0, 0)))])
def test_conv_given_dx_kernel_has_the_plain_gradients(kernel, padding):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 7, 5))
    w = jax.random.normal(jax.random.PRNGKey(1), (kernel, kernel, 5, 6))
    plain = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), padding,  # noqa: E731
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, w: conv2d_given_dx_kernel(x, w, flip_transpose(w), padding)  # noqa: E731
    np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
    for g, g_ref in zip(jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(plain), (0, 1))(x, w)):
        np.testing.assert_allclose(g, g_ref, atol=1e-5 * float(jnp.abs(g_ref).max()))


def test_conv_module_has_nn_conv_parameters():
    x = jnp.ones((1, 8, 8, 3))
    ours = Conv(5, 3, padding=((1, 1), (1, 1))).init(jax.random.PRNGKey(0), x)
    ref = nn.Conv(5, (3, 3), padding=((1, 1), (1, 1))).init(jax.random.PRNGKey(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref)
    np.testing.assert_array_equal(ours["params"]["kernel"], ref["params"]["kernel"])


@pytest.mark.parametrize("shape, ours, ref", [
    ((2, 8, 8, 64), GroupNorm(32, 1e-6), nn.GroupNorm(32, epsilon=1e-6, use_fast_variance=False)),
    ((3, 5, 7, 32), GroupNorm(32, 1e-6), nn.GroupNorm(32, epsilon=1e-6, use_fast_variance=False)),
    ((2, 9, 48), LayerNorm(1e-5), nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)),
    ((2, 9, 48), Dense(24), nn.Dense(24, kernel_init=nn.initializers.normal(0.02))),
    ((2, 3, 5, 16), Dense(8, use_bias=False), nn.Dense(8, use_bias=False, kernel_init=nn.initializers.normal(0.02))),
])
def test_module_value_and_gradients_equal_flax(shape, ours, ref):
    x = jax.random.normal(jax.random.PRNGKey(0), shape) * 3 + 1
    params = ref.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, params)
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
    loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * jnp.cos(x[..., :1]))  # noqa: E731
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), atol=1e-5, rtol=1e-5)
    ours_g = jax.tree.leaves(jax.grad(loss(ours), (0, 1))(params, x))
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


def test_batch_norm_is_pytorchs_including_the_running_variance():
    """Same outputs in both modes and same running averages as torch's BatchNorm2d after two train steps;
    flax's nn.BatchNorm would update the variance with the biased estimate (here off by 24/23)."""
    torch = pytest.importorskip("torch")
    from vqgan_jax.models.norm import BatchNorm

    xs = [np.random.default_rng(i).normal(2.0, 3.0, (2, 3, 4, 5)).astype(np.float32) for i in range(3)]
    ours = BatchNorm()
    variables = ours.init(jax.random.PRNGKey(0), jnp.asarray(xs[0]), train=True)
    params = {"scale": jnp.linspace(0.5, 1.5, 5), "bias": jnp.linspace(-1.0, 1.0, 5)}
    ref = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(np.array(params["scale"])))
        ref.bias.copy_(torch.from_numpy(np.array(params["bias"])))
    stats = variables["batch_stats"]
    for x in xs[:2]:
        y, updates = ours.apply({"params": params, "batch_stats": stats}, jnp.asarray(x), train=True,
                                mutable=["batch_stats"])
        stats = updates["batch_stats"]
        expected = ref.train()(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["mean"], ref.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats["var"], ref.running_var.numpy(), rtol=1e-6)
    y = ours.apply({"params": params, "batch_stats": stats}, jnp.asarray(xs[2]), train=False)
    expected = ref.eval()(torch.from_numpy(xs[2].transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
