"""The loss functions, each against its definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import losses


def test_pixel_losses():
    x, y = jnp.zeros((1, 2, 2, 3)), jnp.full((1, 2, 2, 3), 0.5)
    np.testing.assert_allclose(losses.pixel_loss(x, y, "l1"), 0.5)
    np.testing.assert_allclose(losses.pixel_loss(x, y, "l2"), 0.25)
    with pytest.raises(ValueError, match="unknown pixel loss"):
        losses.pixel_loss(x, y, "l3")


def test_reconstruction_loss_adds_weighted_lpips():
    x, y = jnp.zeros((2, 2, 2, 3)), jnp.ones((2, 2, 2, 3))
    value = losses.reconstruction_loss(x, y, jnp.array([0.2, 0.4]), perceptual_weight=0.5)
    np.testing.assert_allclose(value, 1.0 + 0.5 * 0.3, rtol=1e-6)
    value = losses.reconstruction_loss(x, y, jnp.array([0.2, 0.4]), perceptual_weight=0.5, pixelloss_weight=2.0)
    np.testing.assert_allclose(value, 2.0 + 0.5 * 0.3, rtol=1e-6)


def test_bce_with_logits_is_the_binary_cross_entropy_even_for_large_logits():
    logits = np.array([[-30.0, -3.0, -0.5, 0.0], [0.25, 2.0, 7.0, 30.0]])
    target = np.array([[0.0, 1.0, 0.3, 1.0], [0.0, 0.7, 1.0, 0.0]])
    # -log(sigmoid(x)) = log(1 + exp(-x)) and -log(1 - sigmoid(x)) = log(1 + exp(x)), in float64
    expected = np.mean(target * np.logaddexp(0, -logits) + (1 - target) * np.logaddexp(0, logits))
    for dtype in (jnp.float32, jnp.bfloat16):  # bfloat16 logits (exactly representable here) are computed in float32
        np.testing.assert_allclose(losses.bce_with_logits(jnp.asarray(logits, dtype), jnp.asarray(target)),
                                   expected, rtol=1e-6)


def test_gan_losses():
    real, fake = jnp.array([2.0, 0.5, -1.0]), jnp.array([-2.0, 0.0, 1.0])
    np.testing.assert_allclose(losses.generator_loss(fake), 1 / 3, rtol=1e-6)
    # hinge: mean(relu(1 - real)) = (0 + .5 + 2)/3, mean(relu(1 + fake)) = (0 + 1 + 2)/3
    np.testing.assert_allclose(losses.discriminator_loss(real, fake, "hinge"), 0.5 * (2.5 / 3 + 1.0), rtol=1e-6)
    expected = 0.5 * (np.mean(np.log1p(np.exp(-np.asarray(real)))) + np.mean(np.log1p(np.exp(np.asarray(fake)))))
    np.testing.assert_allclose(losses.discriminator_loss(real, fake, "vanilla"), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown discriminator loss"):
        losses.discriminator_loss(real, fake, "wgan")


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    """lambda from two losses' gradients w.r.t. one kernel, against the norms computed explicitly."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    kernel = jax.random.normal(k[0], (3, 3, 4, 3))
    h = jax.random.normal(k[1], (2, 8, 8, 4))
    target = jax.random.normal(k[2], (2, 8, 8, 3))
    out = lambda w: jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    rec = jax.grad(lambda w: jnp.mean(jnp.abs(out(w) - target)))(kernel)
    gan = jax.grad(lambda w: -jnp.mean(out(w) * 3.0))(kernel)
    expected = np.sqrt(np.sum(np.square(rec))) / (np.sqrt(np.sum(np.square(gan))) + 1e-4) * 0.8
    np.testing.assert_allclose(losses.adaptive_weight(rec, gan, 0.8), expected, rtol=1e-5)
    # Clipped to [0, 1e4] and not differentiated through.
    assert float(losses.adaptive_weight(10 * rec, jnp.zeros_like(gan))) == 1e4
    np.testing.assert_array_equal(jax.grad(lambda r: losses.adaptive_weight(r, gan))(rec), 0.0)


def test_disc_factor_switches_on_at_disc_start():
    assert float(losses.disc_factor(9, 10, 0.7)) == 0.0
    np.testing.assert_allclose(losses.disc_factor(10, 10, 0.7), 0.7)
