"""Transformer training: state, AdamW as the original (decay on linear kernels only), and the pure step.

The step takes a batch of codes (from a code cache) or of images (encoded inside the step by the frozen
first stage, and the condition by its stage), corrupts the inputs (pkeep, cond_drop), and averages the
gradient over `grad_accum` micro-batches with a `lax.scan`, so a large batch fits in memory.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from vqgan_jax import net2net
from vqgan_jax.models import GPT
from vqgan_jax.train.state import learning_rate  # base_learning_rate x batch, as the original


@struct.dataclass
class GPTState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def build_gpt(config) -> GPT:
    fields = config.model.to_dict()
    fields["dtype"] = jnp.dtype(fields["dtype"])
    return GPT(**fields)


def decay_mask(params):
    """True for the linear layers' kernels: the original decays nn.Linear weights only (no biases,
    LayerNorm, token embedding or positional embedding)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def optimizer(config) -> optax.GradientTransformation:
    o = config.optim
    adamw = optax.adamw(learning_rate(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask)
    if o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
    return adamw


def init_state(gpt: GPT, tx, config, rng) -> GPTState:
    k_params, k_state = jax.random.split(rng)
    tokens = jnp.zeros((1, min(config.model.block_size, 2)), jnp.int32)
    params = gpt.init(k_params, tokens)["params"]
    return GPTState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=k_state)


def state_shapes(gpt: GPT, tx, config, mesh, rng):
    """-> (abstract state, its shardings by `config.sharding_rules`), without creating any array."""
    from vqgan_jax.train.sharding import tree_shardings

    abstract = jax.eval_shape(lambda rng: init_state(gpt, tx, config, rng), rng)
    return abstract, tree_shardings(abstract, mesh, config.sharding_rules)


def create_state(gpt: GPT, tx, config, mesh, rng):
    """-> (state, shardings), the state born sharded (`jax.jit(init, out_shardings=...)`)."""
    _, shardings = state_shapes(gpt, tx, config, mesh, rng)
    return jax.jit(lambda rng: init_state(gpt, tx, config, rng), out_shardings=shardings)(rng), shardings


def batch_tokens(config, batch, stage_models=None, stage_params=None):
    """-> (codes [B, L], cond [B, n]) int32 from a code-cache batch ({"codes", "cond"}) or from an image
    batch, encoded by stage_models = (first_vq, cond_vq or None) with stage_params = their params."""
    if "codes" in batch:
        codes = batch["codes"]
        return codes.reshape(codes.shape[0], -1).astype(jnp.int32), batch["cond"].astype(jnp.int32)
    (first_vq, cond_vq), (first_params, cond_params) = stage_models, stage_params
    codes = net2net.image_codes(first_vq, first_params, batch["image"])
    cond = net2net.cond_tokens(config.cond_stage, batch, cond_vq, cond_params)
    return jax.lax.stop_gradient(codes), jax.lax.stop_gradient(cond)


def micro_batches(a, accum: int):
    """[B, ...] -> [accum, B // accum, ...], micro-batch i holding rows i, i + accum, ...: a batch split
    over devices in row blocks gives every device its share of each micro-batch. (Consecutive rows would
    put each micro-batch on 1/accum of the devices, and XLA would copy it to the others, each then
    computing all of it.)"""
    return a.reshape(a.shape[0] // accum, accum, *a.shape[1:]).swapaxes(0, 1)


def make_train_step(gpt: GPT, tx, config, stage_models=None) -> Callable:
    """-> step(state, batch, stage_params) -> (state, metrics). Image batches need the frozen
    stage_models (first_vq, cond_vq or None) and their params; code batches need neither."""
    schedule = learning_rate(config)
    accum = config.optim.grad_accum

    def loss_fn(params, codes, cond, rng):
        logits, targets = net2net.sequence_logits(gpt, params, codes, cond, rng, pkeep=config.pkeep,
                                                  cond_drop=config.cond_drop, train=True)
        return net2net.cross_entropy(logits, targets)

    def step(state: GPTState, batch, stage_params=None):
        codes, cond = batch_tokens(config, batch, stage_models, stage_params)
        rng = jax.random.fold_in(state.rng, state.step)
        if accum == 1:
            loss, grads = jax.value_and_grad(loss_fn)(state.params, codes, cond, rng)
        else:
            if codes.shape[0] % accum:
                raise ValueError(f"batch of {codes.shape[0]} does not split into grad_accum={accum} micro-batches")

            def micro(carry, xs):
                i, (c, n) = xs
                loss, grads = jax.value_and_grad(loss_fn)(state.params, c, n, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            xs = (jnp.arange(accum), (micro_batches(codes, accum), micro_batches(cond, accum)))
            (loss, grads), _ = jax.lax.scan(micro, zeros, xs)
            loss, grads = jax.tree.map(lambda a: a / accum, (loss, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "bits_per_token": loss / jnp.log(2.0), "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def jit_train_step(gpt: GPT, tx, config, mesh, state_shardings, stage_models=None):
    """The step jitted for `mesh`: batch split over every axis, state donated and kept in its shardings,
    frozen stages replicated."""
    from vqgan_jax.train.sharding import batch_sharding, replicated

    return jax.jit(make_train_step(gpt, tx, config, stage_models),
                   in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh)),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def make_eval_step(gpt: GPT, config, stage_models=None) -> Callable:
    """-> step(params, batch, stage_params) -> (summed negative log-likelihood in nats, number of tokens) over
    the rows where batch["mask"] is True (every row without a mask); no corruption, no dropout."""
    def step(params, batch, stage_params=None):
        codes, cond = batch_tokens(config, batch, stage_models, stage_params)
        logits, targets = net2net.sequence_logits(gpt, params, codes, cond, jax.random.PRNGKey(0))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].sum(-1)
        mask = batch.get("mask", jnp.ones(nll.shape, bool))
        return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask) * targets.shape[1]
    return step
