"""The GPT's key/value cache as a pytree: created empty, filled by forward calls, its length set by hand
(the windowed sampler installs a precomputed prefix and rewinds after padded chunks)."""

import jax
import jax.numpy as jnp

_LENGTH_LEAVES = ("cache_index", "position")


def decoder(gpt, block_size: int | None = None):
    """The same GPT in decoding mode (same parameters). `block_size`: a shorter cache, for prefixes of at
    most that many positions; its parameters are the GPT's with `pos_emb` cut to that length."""
    return gpt.clone(decode=True, parent=None, **({} if block_size is None else {"block_size": block_size}))


def empty_cache(dec, batch: int):
    """Zeroed cache for `batch` sequences of up to block_size positions (no forward pass is run)."""
    tokens = jnp.zeros((batch, dec.block_size), jnp.int32)
    shapes = jax.eval_shape(lambda: dec.init(jax.random.PRNGKey(0), tokens)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _name(path) -> str:
    return getattr(path[-1], "key", str(path[-1]))


def set_length(cache, n):
    """The cache with its write position (every layer's index and the positional offset) set to n."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(n, leaf.dtype) if _name(path) in _LENGTH_LEAVES else leaf, cache)


def forward(dec, params, cache, tokens):
    """tokens: int32 [B, t] at the cache's position -> (logits [B, t, V], cache advanced by t)."""
    logits, updated = dec.apply({"params": params, "cache": cache}, tokens, mutable=["cache"])
    return logits, updated["cache"]


def install(cache, prefix, n):
    """Writes `prefix`, the cache of a decoder of block_size n (same layers: leaves [B, heads, n,
    head_dim]), into positions [0, n) of `cache` and sets its length to n."""
    def put(path, leaf, pre):
        if _name(path) in _LENGTH_LEAVES:
            return jnp.asarray(n, leaf.dtype)
        return jax.lax.dynamic_update_slice(leaf, pre.astype(leaf.dtype), (0,) * leaf.ndim)
    return jax.tree_util.tree_map_with_path(put, cache, prefix)


def shortened(gpt, params, n: int):
    """(decoder of block_size n, the GPT's params with pos_emb cut to n positions)."""
    return decoder(gpt, block_size=n), dict(params, pos_emb=params["pos_emb"][:, :n])


def grow(cache, n: int):
    """The cache with room for n positions (its keys and values padded along the position axis with
    zeros), the same length filled."""
    def pad(path, leaf):
        if _name(path) in _LENGTH_LEAVES:
            return leaf
        return jnp.pad(leaf, [(0, 0)] * 2 + [(0, n - leaf.shape[2]), (0, 0)])
    return jax.tree_util.tree_map_with_path(pad, cache)
