"""Logit filters and the token draw shared by the samplers. logits: [B, V] float; masked entries -inf."""

import jax
import jax.numpy as jnp


def top_k_filter(logits, k: int):
    """Keeps the k largest logits (and any tied with the k-th, as the original's `top_k_logits`)."""
    if k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits, p):
    """Nucleus filter: keeps the most likely tokens until their probability reaches p (always at least
    the most likely one, and every token tied with the last one kept)."""
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ahead of each token
    cutoff = jnp.min(jnp.where(before < p, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def filter_logits(logits, temperature=1.0, top_k: int | None = None, top_p=None):
    """temperature, then top-k, then top-p on what is left (the order of the original's sample_fast)."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits


def draw(key, logits, greedy: bool):
    """-> int32 [B]: the argmax, or a sample from softmax(logits)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
