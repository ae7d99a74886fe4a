"""Training state, models and optimisers built from a config."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from vqgan_jax.models import VQGAN, NLayerDiscriminator
from vqgan_jax.models.init import torch_default_init
from vqgan_jax.train import codebook
from vqgan_jax.train.codebook import CodebookState


@struct.dataclass
class TrainState:
    step: jax.Array
    gen_params: Any
    gen_opt_state: Any
    disc_params: Any
    disc_batch_stats: Any
    disc_opt_state: Any
    ema_params: Any  # None when config.optim.ema_decay == 0
    codebook: CodebookState  # usage and EMA statistics of the quantiser's codebook
    lecam: jax.Array  # [2] float32: EMAs of the discriminator's mean logits on real and fake (LeCAM)
    rng: jax.Array


@struct.dataclass
class Models:
    """The static half of training: modules and optimisers (no arrays)."""
    vq: VQGAN = struct.field(pytree_node=False)
    disc: NLayerDiscriminator = struct.field(pytree_node=False)
    gen_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    disc_tx: optax.GradientTransformation = struct.field(pytree_node=False)
    lpips: nn.Module = struct.field(pytree_node=False)


def learning_rate(config) -> optax.Schedule:
    """base_learning_rate x global batch size, as the original; optional linear warmup and cosine decay."""
    peak = config.optim.base_learning_rate * config.batch_size
    warmup = config.optim.warmup_steps
    if config.optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), max(config.total_steps, warmup + 1))
    if config.optim.schedule != "constant":
        raise ValueError(f"unknown schedule {config.optim.schedule!r}: use 'constant' or 'cosine'")
    return optax.linear_schedule(0.0, peak, warmup) if warmup > 0 else optax.constant_schedule(peak)


def optimizer(config, frozen_codebook: bool = False) -> optax.GradientTransformation:
    """Adam with the original's betas (0.5, 0.9), with optional global-norm clipping. `frozen_codebook`:
    the quantiser's codebook is left out (no update, no moments, not in the clipped norm): the EMA
    codebook is computed, not learnt."""
    tx = optax.adam(learning_rate(config), b1=config.optim.b1, b2=config.optim.b2)
    if config.optim.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip), tx)
    if frozen_codebook:
        labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, _: "frozen" if codebook.is_codebook(path) else "trained", params)
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def with_count(opt_state, step):
    """opt_state with every step counter in it (Adam's bias corrections, a schedule's position) set to
    `step`, an int32 scalar."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.asarray(step, x.dtype) if getattr(path[-1], "name", None) == "count" else x, opt_state)


def build_models(config) -> Models:
    from vqgan_jax.models import LPIPS

    vq = VQGAN(**config.model.to_dict())
    disc = NLayerDiscriminator(ndf=config.loss.disc_ndf, n_layers=config.loss.disc_num_layers)
    return Models(vq, disc, optimizer(config, frozen_codebook=config.codebook.ema), optimizer(config),
                  LPIPS(dropout=config.loss.perceptual_dropout))


def init_state(models: Models, config, rng) -> TrainState:
    """A fresh state; meant to run under `jax.jit(..., out_shardings=...)` so it is born sharded."""
    size = config.data.size
    dummy = jnp.zeros((1, size, size, models.vq.in_channels), jnp.float32)
    k_gen, k_disc, k_state, k_torch = jax.random.split(rng, 4)
    gen_params = models.vq.init(k_gen, dummy)["params"]
    disc_vars = models.disc.init(k_disc, dummy, train=False)
    if config.param_init == "torch":
        # The discriminator's kernels and norms keep their own draw: the original's `weights_init` sets them.
        gen_params = torch_default_init(gen_params, jax.random.fold_in(k_torch, 0))
        disc_vars = dict(disc_vars, params=torch_default_init(disc_vars["params"], jax.random.fold_in(k_torch, 1),
                                                              kernels=False))
    elif config.param_init != "flax":
        raise ValueError(f"unknown param_init {config.param_init!r}: use 'torch' or 'flax'")
    ema = gen_params if config.optim.ema_decay > 0 else None
    return TrainState(step=jnp.zeros((), jnp.int32), gen_params=gen_params,
                      gen_opt_state=models.gen_tx.init(gen_params), disc_params=disc_vars["params"],
                      disc_batch_stats=disc_vars["batch_stats"], disc_opt_state=models.disc_tx.init(disc_vars["params"]),
                      ema_params=ema,
                      codebook=codebook.init_state(codebook.get_codebook(gen_params), config.codebook.ema),
                      lecam=jnp.zeros((2,), jnp.float32), rng=k_state)


def state_shapes(models: Models, config, mesh, rng):
    """-> (abstract state, its shardings by `config.sharding_rules`), without creating any array."""
    from vqgan_jax.train.sharding import tree_shardings

    abstract = jax.eval_shape(lambda rng: init_state(models, config, rng), rng)
    return abstract, tree_shardings(abstract, mesh, config.sharding_rules)


def create_state(models: Models, config, mesh, rng):
    """-> (state, shardings): the state is created already sharded (`jax.jit(init, out_shardings=...)`),
    never whole on one device."""
    _, shardings = state_shapes(models, config, mesh, rng)
    init = lambda rng: init_state(models, config, rng)  # noqa: E731
    return jax.jit(init, out_shardings=shardings)(rng), shardings
