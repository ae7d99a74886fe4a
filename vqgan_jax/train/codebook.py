"""Keeping the codebook alive during training: EMA codebook updates, dead-code restarts and usage counts.

All pure functions of global arrays: inside the jitted step every sum over the batch is already a sum over
all devices and hosts (XLA inserts the reductions), so counts, EMA statistics and restarts come out the
same on every device.

The codebook stays in the generator's params (`quantize/embedding/embedding`, [K, code_dim]), so models,
exports and sampling never see these options; with EMA it is only kept out of the optimiser.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

CODEBOOK_PATH = ("quantize", "embedding", "embedding")


@struct.dataclass
class CodebookState:
    last_used: jax.Array     # [K] int32: last step whose batch selected the code; -1: never selected
    last_restart: jax.Array  # [K] int32: last step the code was restarted; -1: never
    cluster_size: Any        # [K] float32: EMA of each code's assignment count; None without EMA
    embed_sum: Any           # [K, code_dim] float32: EMA of the sum of its assigned latents; None without EMA


def check_config(config) -> None:
    """Refuses codebook settings that would train wrongly or silently do nothing; config: the whole VQGAN
    training config."""
    cb, m = config.codebook, config.model
    if not 0.0 < cb.ema_decay < 1.0:
        raise ValueError(f"codebook.ema_decay must be in (0, 1), got {cb.ema_decay}")
    if cb.ema_eps <= 0:
        raise ValueError(f"codebook.ema_eps must be > 0 (it keeps unused codes from dividing by 0), got {cb.ema_eps}")
    if cb.restart_dead < 0 or cb.usage_window < 1:
        raise ValueError(f"codebook.restart_dead must be >= 0 (0: off) and codebook.usage_window >= 1, got "
                         f"{cb.restart_dead} and {cb.usage_window}")
    if m.codebook_dim < 0:
        raise ValueError(f"model.codebook_dim must be >= 0 (0: search in embed_dim), got {m.codebook_dim}")
    if m.entropy_weight and m.entropy_temperature <= 0:
        raise ValueError(f"model.entropy_temperature must be > 0, got {m.entropy_temperature}")


def get_codebook(params) -> jax.Array:
    return params[CODEBOOK_PATH[0]][CODEBOOK_PATH[1]][CODEBOOK_PATH[2]]


def set_codebook(params, codebook):
    """A copy of `params` with the codebook replaced (no other leaf is copied)."""
    a, b, c = CODEBOOK_PATH
    return {**params, a: {**params[a], b: {**params[a][b], c: codebook}}}


def is_codebook(path) -> bool:
    """For a `jax.tree_util` key path: is this leaf the codebook?"""
    return tuple(getattr(k, "key", k) for k in path)[-3:] == CODEBOOK_PATH


def init_state(codebook: jax.Array, ema: bool) -> CodebookState:
    """EMA statistics start as one observation of each initial code (count 1, sum = the code), so that a
    code keeps its initial value until the batches move it."""
    never = jnp.full(codebook.shape[:1], -1, jnp.int32)
    if not ema:
        return CodebookState(never, never, None, None)
    return CodebookState(never, never, jnp.ones(codebook.shape[:1], jnp.float32), codebook.astype(jnp.float32))


def assignment_stats(latents: jax.Array, indices: jax.Array, n_embed: int) -> tuple[jax.Array, jax.Array]:
    """latents: [..., d]; indices: [...] -> (counts [K] float32, sums [K, d] of the latents assigned to
    each code)."""
    flat = latents.reshape(-1, latents.shape[-1]).astype(jnp.float32)
    idx = indices.reshape(-1)
    counts = jnp.zeros((n_embed,), jnp.float32).at[idx].add(1.0)
    sums = jax.ops.segment_sum(flat, idx, num_segments=n_embed)
    return counts, sums


def ema_update(cluster_size, embed_sum, counts, sums, decay: float, eps: float):
    """One EMA step of the codebook statistics -> (cluster_size, embed_sum, codebook).

    codebook = embed_sum / smoothed counts, the counts Laplace-smoothed (`eps` added to each, rescaled to
    keep their total) so that a rarely used code never divides by zero."""
    cluster_size = decay * cluster_size + (1.0 - decay) * counts
    embed_sum = decay * embed_sum + (1.0 - decay) * sums
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (total + cluster_size.shape[0] * eps) * total
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


def dead_codes(state: CodebookState, step, patience: int) -> jax.Array:
    """[K] bool: codes neither selected nor restarted in the last `patience` steps up to `step`."""
    return step - jnp.maximum(state.last_used, state.last_restart) >= patience


def restart_candidates(latents: jax.Array, n_embed: int, rng) -> jax.Array:
    """latents: [..., d] of the global batch -> [K, d]: one latent for each code, drawn without replacement
    while the batch has enough (with N < K positions, each is used about K/N times)."""
    flat = latents.reshape(-1, latents.shape[-1])
    order = jax.random.permutation(rng, flat.shape[0])
    return flat[order[jnp.arange(n_embed) % flat.shape[0]]]


def codes_used(state: CodebookState, step, window: int) -> jax.Array:
    """[] int32: distinct codes selected in the `window` steps up to and including `step`."""
    return jnp.sum((state.last_used >= 0) & (state.last_used > step - window)).astype(jnp.int32)


def update(config, params, state: CodebookState, latents, indices, step, rng):
    """After the optimiser: the EMA codebook, then restarts of dead codes -> (params, state, metrics).

    config: the `codebook` config block (ema, ema_decay, ema_eps, restart_dead, usage_window);
    latents: [B, h, w, code_dim] and indices [B, h, w] of this step's forward pass (the codebook before
    this update); step: this step's index."""
    codebook = get_codebook(params)
    n_embed = codebook.shape[0]
    counts, sums = assignment_stats(jax.lax.stop_gradient(latents), indices, n_embed)
    state = state.replace(last_used=jnp.where(counts > 0, step, state.last_used).astype(jnp.int32))
    if config.ema:
        cluster_size, embed_sum, codebook = ema_update(state.cluster_size, state.embed_sum, counts, sums,
                                                       config.ema_decay, config.ema_eps)
        state = state.replace(cluster_size=cluster_size, embed_sum=embed_sum)
    restarted = jnp.zeros((), jnp.int32)
    if config.restart_dead:
        dead = dead_codes(state, step, config.restart_dead)
        fresh = restart_candidates(jax.lax.stop_gradient(latents), n_embed, rng).astype(codebook.dtype)
        codebook = jnp.where(dead[:, None], fresh, codebook)
        state = state.replace(last_restart=jnp.where(dead, step, state.last_restart).astype(jnp.int32))
        if config.ema:  # a restarted code starts over as one observation of its new value
            state = state.replace(cluster_size=jnp.where(dead, 1.0, state.cluster_size),
                                  embed_sum=jnp.where(dead[:, None], fresh, state.embed_sum))
        restarted = jnp.sum(dead).astype(jnp.int32)
    used = codes_used(state, step, config.usage_window)
    metrics = {"codes_used_window": used, "dead_codes": n_embed - used, "codes_restarted": restarted}
    return set_codebook(params, codebook), state, metrics
