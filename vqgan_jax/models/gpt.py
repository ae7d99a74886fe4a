"""minGPT as used by taming's Net2NetTransformer, with an optional KV cache for decoding.

Names mirror the original's `state_dict` (`blocks.0.attn.query` is `blocks_0/attn/query` here).

Decoding (`decode=True`): initialise the cache with `model.init(rng, tokens_of_full_length)["cache"]`
(or `jax.eval_shape` of it, zeroed), then call `apply({"params": p, "cache": c}, tokens, mutable=["cache"])`
with one or more new tokens at a time; each call appends their keys and values at the cache index, so every
token is computed once, as in flax's lm1b example. The cache holds `block_size` positions and the position
is traced, so nothing can check it: calls that go past it (the original raises) overwrite its last entries.
The samplers size their caches and never do.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models.checks import check_codes, negatives_past_end
from vqgan_jax.models.conv import add_bias
from vqgan_jax.models.norm import LayerNorm

Dtype = Any
_init = nn.initializers.normal(0.02)


def _gather_identity(g):
    idx = jnp.arange(g.shape[1])
    return g.at[:, idx].get(mode="promise_in_bounds", unique_indices=True, indices_are_sorted=True)


@jax.custom_vjp
def materialize_grad(x):
    """The identity, whose gradient (x: [B, T, ...]) is computed once and stored.

    The residual stream's gradient is a long chain of cheap adds through every block's LayerNorm backward.
    XLA:CPU fuses such a chain into each of its consumers (the weight-gradient transposes, the next adds)
    and so recomputes the whole chain from the top of the network once per consumer, which cost a third of
    a training step. `lax.optimization_barrier` does not stop it (the CPU pipeline removes barriers before
    fusion); a gather, which XLA counts as expensive and therefore never duplicates, does. Here it is a
    gather with iota indices, the identity; other platforms get the plain identity."""
    return x


def _materialize_grad_fwd(x):
    return x, None


def _materialize_grad_bwd(_, g):
    return (jax.lax.platform_dependent(g, cpu=_gather_identity, default=lambda g: g),)


materialize_grad.defvjp(_materialize_grad_fwd, _materialize_grad_bwd)


class Dense(nn.Module):
    """`nn.Dense` (same `kernel`/`bias` parameters and initialisers) over x: [..., C_in] -> [..., features],
    written for XLA:CPU's sake: x is flattened to one token axis, so that the weight gradient is a single
    [N, C_in]^T [N, C_out] product (with [B, T] apart XLA:CPU copies the output gradient transposed and
    multiplies two transposed operands, at half the rate), and the bias gradient is `add_bias`'s product
    with a vector of ones (XLA:CPU's column sum over N runs several times slower)."""
    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Any = _init

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features)).astype(self.dtype)
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel)
        if self.use_bias:
            y = add_bias(y, self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype))
        return y.reshape(*x.shape[:-1], self.features)


def gelu(x):
    """Exact GELU as PyTorch computes it, x * 0.5 * (1 + erf(x / sqrt(2))) (jax.nn.gelu(approximate=False)
    goes through erfc, which XLA:CPU evaluates with an exp and is slower)."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


def attention_mask(q_pos, k_pos, n_unmasked: int):
    """Causal mask [Tq, Tk]: True where query q may attend key k; the first `n_unmasked` positions see
    each other in full (the original's `mask[:n_unmasked, :n_unmasked] = 1`)."""
    q, k = q_pos[:, None], k_pos[None, :]
    return (k <= q) | ((q < n_unmasked) & (k < n_unmasked))


def attention_bias(q_pos, k_pos, n_unmasked: int, dtype):
    """[Tq, Tk] added to the attention logits: 0 where `attention_mask` allows, the dtype's lowest value
    elsewhere (the original fills -inf): exp gives 0 either way, and an add is cheaper to differentiate
    than a select."""
    return jnp.where(attention_mask(q_pos, k_pos, n_unmasked), 0.0, jnp.finfo(dtype).min).astype(dtype)


class CausalSelfAttention(nn.Module):
    n_embd: int
    n_head: int
    block_size: int
    n_unmasked: int = 0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    decode: bool = False
    dtype: Dtype = jnp.float32
    query_blocks: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, t, c = x.shape
        hd = c // self.n_head
        dense = lambda name: Dense(c, dtype=self.dtype, name=name)  # noqa: E731
        # Heads ahead of positions ([B, H, T, hd]): the cache is read every decoding step, and in this layout
        # both attention matmuls take it as it lies (with [B, T, H, hd] XLA copies it transposed each step).
        k, q, v = (dense(name)(x).reshape(b, t, self.n_head, hd).transpose(0, 2, 1, 3)
                   for name in ("key", "query", "value"))

        q_pos = jnp.arange(t)
        if self.decode:
            initialised = self.has_variable("cache", "cached_key")
            cached_k = self.variable("cache", "cached_key", jnp.zeros, (b, self.n_head, self.block_size, hd), k.dtype)
            cached_v = self.variable("cache", "cached_value", jnp.zeros, (b, self.n_head, self.block_size, hd), v.dtype)
            index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            if initialised:
                start = index.value
                cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, 0, start, 0))
                cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, 0, start, 0))
                index.value = start + t
                k, v, q_pos = cached_k.value, cached_v.value, start + q_pos
        # 1/sqrt(hd) on q rather than on the [Tq, Tk] logits: Tk / hd times less work, and exact when hd is a
        # power of 4 (e.g. 64).
        q = q * jnp.asarray(1.0 / hd ** 0.5, q.dtype)
        dropout = nn.Dropout(self.attn_pdrop, deterministic=not train)
        # Over the whole sequence, queries in row blocks: each block's keys end at its last query (or at
        # n_unmasked), so the products skip most of the masked upper triangle (5/8 of the work with 4 blocks).
        blocks = 1 if self.decode else min(self.query_blocks, t)
        bounds = [t * i // blocks for i in range(blocks + 1)]
        ys = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            keys = k.shape[2] if self.decode else min(max(end, self.n_unmasked), t)
            bias = attention_bias(q_pos[start:end], jnp.arange(keys), self.n_unmasked, q.dtype)
            att = jnp.einsum("bhqd,bhkd->bhqk", q[:, :, start:end], k[:, :, :keys]) + bias
            ys.append(jnp.einsum("bhqk,bhkd->bqhd", dropout(nn.softmax(att, axis=-1)), v[:, :, :keys]))
        y = jnp.concatenate(ys, axis=1).reshape(b, t, c)
        y = dense("proj")(y)
        return nn.Dropout(self.resid_pdrop, deterministic=not train)(y)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)) with exact (erf) GELU."""
    n_embd: int
    n_head: int
    block_size: int
    n_unmasked: int = 0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    decode: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        ln = lambda name: LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)  # noqa: E731
        x = materialize_grad(x)
        x = x + CausalSelfAttention(self.n_embd, self.n_head, self.block_size, self.n_unmasked,
                                    self.attn_pdrop, self.resid_pdrop, self.decode, self.dtype,
                                    name="attn")(ln("ln1")(x), train)
        x = materialize_grad(x)
        h = Dense(4 * self.n_embd, dtype=self.dtype, name="mlp_0")(ln("ln2")(x))
        h = Dense(self.n_embd, dtype=self.dtype, name="mlp_2")(gelu(h))
        return x + nn.Dropout(self.resid_pdrop, deterministic=not train)(h)


class GPT(nn.Module):
    """tokens: [B, T] int in [0, vocab_size) -> logits [B, T', vocab_size], T' = T (+ prepended embeddings).

    Field names and defaults are the original's `GPT(vocab_size, block_size, n_layer=12, n_head=8,
    n_embd=256, embd_pdrop=0., resid_pdrop=0., attn_pdrop=0., n_unmasked=0)`.
    """
    vocab_size: int
    block_size: int
    n_layer: int = 12
    n_head: int = 8
    n_embd: int = 256
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    n_unmasked: int = 0
    decode: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens, embeddings=None, train: bool = False):
        """embeddings: optional [B, n, n_embd] vectors placed before the tokens (the original's `embeddings`)."""
        if tokens.ndim != 2:
            raise ValueError(f"expected tokens [B, T], got shape {tuple(tokens.shape)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        check_codes(tokens, self.vocab_size, "tokens")
        x = nn.Embed(self.vocab_size, self.n_embd, embedding_init=_init, name="tok_emb")(
            negatives_past_end(tokens, self.vocab_size))
        if embeddings is not None:
            if embeddings.ndim != 3 or embeddings.shape[0] != x.shape[0] or embeddings.shape[2] != self.n_embd:
                raise ValueError(f"embeddings must be [B, n, n_embd] = [{x.shape[0]}, n, {self.n_embd}], got shape "
                                 f"{tuple(embeddings.shape)}")
            x = jnp.concatenate([embeddings.astype(x.dtype), x], axis=1)
        t = x.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} positions exceeds block_size={self.block_size}")

        pos_emb = self.param("pos_emb", nn.initializers.zeros, (1, self.block_size, self.n_embd))
        start = 0
        if self.decode:
            position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            if not self.is_initializing():  # the init call only creates the (empty) cache
                start = position.value
                position.value = start + t
        x = x + jax.lax.dynamic_slice_in_dim(pos_emb, start, x.shape[1], axis=1).astype(x.dtype)
        x = nn.Dropout(self.embd_pdrop, deterministic=not train)(x)
        for i in range(self.n_layer):
            x = Block(self.n_embd, self.n_head, self.block_size, self.n_unmasked, self.attn_pdrop,
                      self.resid_pdrop, self.decode, self.dtype, name=f"blocks_{i}")(x, train)
        x = LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_f")(materialize_grad(x))
        # Logits in float32 whatever the compute dtype: bfloat16's spacing at logits of 16-32 is 0.125, noise
        # in the loss and in the sampling probabilities.
        return Dense(self.vocab_size, use_bias=False, dtype=jnp.float32, name="head")(x)
