"""The VQGAN's losses (taming's `VQLPIPSWithDiscriminator`) as small pure functions.

Images are [B, H, W, C] in [-1, 1]; discriminator logits [B, h, w, 1]; every loss is a scalar.
"""

import jax
import jax.numpy as jnp


def pixel_loss(x, x_rec, kind: str = "l1"):
    """Mean absolute (l1) or squared (l2) error per pixel and channel."""
    if kind not in ("l1", "l2"):
        raise ValueError(f"unknown pixel loss {kind!r}: use 'l1' or 'l2'")
    d = x - x_rec
    return jnp.mean(jnp.abs(d) if kind == "l1" else d ** 2)


def reconstruction_loss(x, x_rec, lpips_distance, perceptual_weight: float = 1.0,
                        pixelloss_weight: float = 1.0, kind: str = "l1"):
    """The original's `nll_loss`: pixel term + perceptual_weight x mean LPIPS. lpips_distance: [B]."""
    return pixelloss_weight * pixel_loss(x, x_rec, kind) + perceptual_weight * jnp.mean(lpips_distance)


def generator_loss(logits_fake):
    """-E[D(x_rec)]: the generator raises the discriminator's score of its reconstructions."""
    return -jnp.mean(logits_fake)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def discriminator_loss(logits_real, logits_fake, kind: str = "hinge"):
    if kind not in DISC_LOSSES:
        raise ValueError(f"unknown discriminator loss {kind!r}: use one of {sorted(DISC_LOSSES)}")
    return DISC_LOSSES[kind](logits_real, logits_fake)


def adaptive_weight(rec_grad, gan_grad, disc_weight: float = 1.0):
    """lambda = ||grad_W L_rec|| / (||grad_W L_G|| + 1e-4), clipped to [0, 1e4], times disc_weight, with W
    the decoder's last layer: balances the GAN term against reconstruction. Not differentiated through."""
    weight = jnp.linalg.norm(rec_grad.reshape(-1)) / (jnp.linalg.norm(gan_grad.reshape(-1)) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(weight, 0.0, 1e4) * disc_weight)


def lecam_regularizer(logits_real, logits_fake, ema_real, ema_fake):
    """LeCAM (Tseng et al. 2021): E[relu(D(x) - ema_fake)^2] + E[relu(ema_real - D(x_rec))^2], with the
    EMAs of the discriminator's mean outputs on real and fake: keeps its predictions from drifting apart,
    which steadies GAN training with little data. Added to the discriminator's loss."""
    ema_real, ema_fake = jax.lax.stop_gradient(ema_real), jax.lax.stop_gradient(ema_fake)
    return (jnp.mean(jax.nn.relu(logits_real - ema_fake) ** 2)
            + jnp.mean(jax.nn.relu(ema_real - logits_fake) ** 2))


def disc_factor(step, disc_start: int, factor: float = 1.0):
    """`factor` from `disc_start` on, 0 before (the original's `adopt_weight`)."""
    return jnp.where(step >= disc_start, factor, 0.0)


def bce_with_logits(logits, target):
    """Mean binary cross-entropy of logits against targets in [0, 1] (PyTorch's
    binary_cross_entropy_with_logits): the segmentation VQGAN's reconstruction loss."""
    logits = logits.astype(jnp.float32)
    return jnp.mean(jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits))))
