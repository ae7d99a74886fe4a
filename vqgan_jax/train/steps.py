"""The VQGAN training step: generator and discriminator updates as one pure function.

One autoencoder forward serves both updates (the original runs it once per optimiser). The adaptive GAN
weight needs the gradients of the reconstruction and GAN losses at the decoder's last conv kernel: they
come from the same `vjp` as the full update, called with each loss's image cotangent and keeping only that
kernel's gradient — XLA drops the rest of those two backward passes as dead code, so the price is two
small weight-gradient convolutions, not two extra backward passes.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from vqgan_jax import losses
from vqgan_jax.metrics import lpips_distance, psnr
from vqgan_jax.train import codebook
from vqgan_jax.train.state import Models, TrainState, learning_rate, with_count


def phase(step: int, loss_config) -> tuple[bool, bool]:
    """(GAN term in the generator loss, discriminator trained) at `step`, decided on the host so that
    steps before `disc_start` compile without the discriminator at all (the original runs it all the same,
    with a zero loss weight: only its BatchNorm running averages, which nothing in training reads, start
    later here). The segmentation VQGAN has no discriminator."""
    if loss_config.kind == "segmentation":
        return False, False
    active = step >= loss_config.disc_start
    return active, active or loss_config.disc_train_from_start


def model_input(config, batch):
    """The autoencoder's input: batch["image"] [B, H, W, C] in [-1, 1], or, for the segmentation VQGAN
    (config.image_key "segmentation"), batch["segmentation"] int [B, H, W] one-hot over in_channels labels."""
    if config.image_key == "segmentation":
        return jax.nn.one_hot(batch["segmentation"], config.model.in_channels, dtype=jnp.float32)
    return batch[config.image_key]


def make_train_step(models: Models, config, gan_in_generator: bool, train_disc: bool) -> Callable:
    """-> step(state, batch, lpips_params) -> (state, metrics); batch["image"]: [B, H, W, C] in [-1, 1]."""
    lc = config.loss
    schedule = learning_rate(config)
    ema_decay = config.optim.ema_decay
    disc_start_for_d = 0 if lc.disc_train_from_start else lc.disc_start

    def disc_logits(params, batch_stats, images):
        logits, updates = models.disc.apply({"params": params, "batch_stats": batch_stats}, images,
                                            train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    def step(state: TrainState, batch, lpips_params):
        x = model_input(config, batch)
        rng = jax.random.fold_in(state.rng, state.step)

        def autoencode(params):
            x_rec, q = models.vq.apply({"params": params}, x, train=True, rngs={"dropout": rng})
            # Losses in float32 whatever the models' compute dtype.
            return (x_rec.astype(jnp.float32), q.loss.astype(jnp.float32)), q

        (x_rec, q_loss), vjp_fn, q = jax.vjp(autoencode, state.gen_params, has_aux=True)

        def rec_loss(x_rec):
            if lc.kind == "segmentation":
                return losses.bce_with_logits(x_rec, x), jnp.zeros((), jnp.float32)
            if lc.perceptual_weight > 0:
                d = models.lpips.apply({"params": lpips_params}, x, x_rec, train=True,
                                       rngs={"dropout": jax.random.fold_in(rng, 2)})
            else:  # as the original: no LPIPS network at all, and p_loss logs 0
                d = jnp.zeros(x.shape[:1], jnp.float32)
            nll = losses.reconstruction_loss(x, x_rec, d, lc.perceptual_weight, lc.pixelloss_weight, lc.pixel_loss)
            return nll, jnp.mean(d)

        (nll, p_loss), g_rec = jax.value_and_grad(rec_loss, has_aux=True)(x_rec)
        zero = jnp.zeros((), jnp.float32)
        g_loss, d_weight, factor, image_cotangent = zero, zero, zero, g_rec
        batch_stats = state.disc_batch_stats
        if gan_in_generator:
            def gan(x_rec):
                logits, stats = disc_logits(state.disc_params, state.disc_batch_stats, x_rec)
                return losses.generator_loss(logits), stats

            # This pass updates the running averages too, then real and fake do: the original's order.
            (g_loss, batch_stats), g_gan = jax.value_and_grad(gan, has_aux=True)(x_rec)
            if lc.adaptive_weight:
                last_layer = lambda cot: vjp_fn((cot, zero))[0]["decoder"]["conv_out"]["kernel"]  # noqa: E731
                d_weight = losses.adaptive_weight(last_layer(g_rec), last_layer(g_gan), lc.disc_weight)
            else:
                d_weight = jnp.asarray(lc.disc_weight, jnp.float32)
            factor = losses.disc_factor(state.step, lc.disc_start, lc.disc_factor)
            image_cotangent = g_rec + d_weight * factor * g_gan
        grads = vjp_fn((image_cotangent, jnp.asarray(lc.codebook_weight, jnp.float32)))[0]
        updates, gen_opt_state = models.gen_tx.update(grads, state.gen_opt_state, state.gen_params)
        gen_params = optax.apply_updates(state.gen_params, updates)
        gen_params, codebook_state, codebook_metrics = codebook.update(
            config.codebook, gen_params, state.codebook, q.latents, q.indices, state.step,
            jax.random.fold_in(rng, 1))

        metrics = {
            "total_loss": nll + d_weight * factor * g_loss + lc.codebook_weight * q_loss,
            # rec_loss as the original logs it: pixel + perceptual terms (nll_loss too, while logvar is 0).
            "nll_loss": nll, "rec_loss": nll, "pixel_loss": losses.pixel_loss(x, x_rec, lc.pixel_loss), "p_loss": p_loss,
            "quant_loss": q_loss, "g_loss": g_loss, "d_weight": d_weight, "disc_factor": factor,
            "codebook_usage": q.usage, "perplexity": q.perplexity, "psnr": jnp.mean(psnr(x, x_rec)),
            "learning_rate": schedule(state.step), **codebook_metrics,
        }
        if lc.kind == "segmentation":  # x_rec holds logits: accuracy of the argmax label, not PSNR
            del metrics["psnr"], metrics["rec_loss"], metrics["pixel_loss"], metrics["p_loss"]
            metrics["pixel_accuracy"] = jnp.mean(jnp.argmax(x_rec, -1) == jnp.argmax(x, -1))

        disc_params, disc_opt_state, lecam = state.disc_params, state.disc_opt_state, state.lecam
        if train_disc:
            fake = jax.lax.stop_gradient(x_rec)

            def disc_loss(params):
                # Real and fake go through separately, as in the original: each batch is normalised
                # with its own BatchNorm statistics.
                real_logits, stats = disc_logits(params, batch_stats, x)
                fake_logits, stats = disc_logits(params, stats, fake)
                weight = losses.disc_factor(state.step, disc_start_for_d, lc.disc_factor)
                loss = weight * losses.discriminator_loss(real_logits, fake_logits, lc.disc_loss)
                means = jnp.stack([jnp.mean(real_logits), jnp.mean(fake_logits)])
                new_lecam = lecam
                if lc.lecam_weight:
                    new_lecam = lc.lecam_decay * lecam + (1.0 - lc.lecam_decay) * jax.lax.stop_gradient(means)
                    reg = losses.lecam_regularizer(real_logits, fake_logits, new_lecam[0], new_lecam[1])
                    loss = loss + weight * lc.lecam_weight * reg
                return loss, (stats, means, new_lecam)

            (d_loss, (batch_stats, means, lecam)), d_grads = jax.value_and_grad(disc_loss, has_aux=True)(disc_params)
            # The original steps the discriminator's Adam on every batch, with zero gradients before
            # disc_start: its moments are still zero there, but its bias corrections are those of step
            # disc_start + 1: its first real update is up to 1.58x what a fresh Adam makes at betas (0.5, 0.9).
            # Steps before disc_start leave the discriminator out here, so its counters take the step.
            d_updates, disc_opt_state = models.disc_tx.update(d_grads, with_count(disc_opt_state, state.step),
                                                              disc_params)
            disc_params = optax.apply_updates(disc_params, d_updates)
            metrics.update(disc_loss=d_loss, logits_real=means[0], logits_fake=means[1])

        ema = state.ema_params
        if ema is not None:
            ema = optax.incremental_update(gen_params, ema, 1.0 - ema_decay)
        new_state = state.replace(step=state.step + 1, gen_params=gen_params, gen_opt_state=gen_opt_state,
                                  disc_params=disc_params, disc_batch_stats=batch_stats,
                                  disc_opt_state=disc_opt_state, ema_params=ema, codebook=codebook_state,
                                  lecam=lecam)
        return new_state, metrics

    return step


def jit_train_step(models: Models, config, mesh, state_shardings, gan_in_generator: bool, train_disc: bool):
    """The step jitted for `mesh`: batch split over every axis, state donated and kept in its shardings."""
    from vqgan_jax.train.sharding import batch_sharding, replicated

    return jax.jit(make_train_step(models, config, gan_in_generator, train_disc),
                   in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def make_eval_step(models: Models) -> Callable:
    """-> step(gen_params, images, lpips_params) -> ({psnr, lpips, l1}: each [B], indices [B, h, w]).
    The reconstruction is clipped to [-1, 1] first, as any image written out would be."""
    def step(gen_params, x, lpips_params):
        x_rec, q = models.vq.apply({"params": gen_params}, x)
        x_rec = jnp.clip(x_rec.astype(jnp.float32), -1.0, 1.0)
        per_image = {"psnr": psnr(x, x_rec), "lpips": lpips_distance(lpips_params, x, x_rec),
                     "l1": jnp.mean(jnp.abs(x - x_rec), axis=(1, 2, 3))}
        return per_image, q.indices
    return step
