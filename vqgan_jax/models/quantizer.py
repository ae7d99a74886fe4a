"""Vector quantisation with a straight-through estimator (taming's `VectorQuantizer2`)."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class QuantizerOutput(NamedTuple):
    z_q: jax.Array          # [B, h, w, D] quantised latents, straight-through: gradient flows to z unchanged
    indices: jax.Array      # [B, h, w] int32 code indices, raster order
    loss: jax.Array         # [] codebook + commitment loss
    perplexity: jax.Array   # [] exp(entropy) of the code histogram of this batch
    usage: jax.Array        # [] fraction of the codebook used in this batch


def codebook_stats(indices: jax.Array, n_embed: int) -> tuple[jax.Array, jax.Array]:
    """indices: int array of any shape -> (perplexity, fraction of the `n_embed` codes that occur)."""
    counts = jnp.bincount(indices.reshape(-1), length=n_embed)
    probs = counts / indices.size
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
    return perplexity, jnp.mean(counts > 0)


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation by squared distance.

    loss = commitment + codebook, each a mean squared error with one side under `stop_gradient`; `beta`
    weighs the commitment term (the encoder pulled toward its code), or, with `legacy=True`, the codebook
    term: the original's long-standing placement, with which every released checkpoint was trained.
    """
    n_embed: int
    embed_dim: int
    beta: float = 0.25
    legacy: bool = True

    def setup(self):
        self.embedding = nn.Embed(
            self.n_embed, self.embed_dim, name="embedding",
            embedding_init=_symmetric_uniform(1.0 / self.n_embed))

    def __call__(self, z) -> QuantizerOutput:
        """z: [B, h, w, embed_dim]."""
        codebook = self.embedding.embedding
        flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)
        # HIGHEST precision: TF32/bf16 matmuls on accelerators would otherwise flip near-tie indices.
        dots = jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
        dist = jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1) - 2 * dots
        indices = jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(z.shape[:-1])

        z32, z_q32 = z.astype(jnp.float32), jnp.take(codebook, indices, axis=0)
        commitment = jnp.mean((jax.lax.stop_gradient(z_q32) - z32) ** 2)
        codebook_term = jnp.mean((z_q32 - jax.lax.stop_gradient(z32)) ** 2)
        if self.legacy:
            loss = commitment + self.beta * codebook_term
        else:
            loss = self.beta * commitment + codebook_term

        z_q = z + jax.lax.stop_gradient(z_q32.astype(z.dtype) - z)
        perplexity, usage = codebook_stats(indices, self.n_embed)
        return QuantizerOutput(z_q, indices, loss, perplexity, usage)

    def lookup(self, indices):
        """indices: [B, h, w] int -> [B, h, w, embed_dim] codebook vectors."""
        return jnp.take(self.embedding.embedding, indices, axis=0)


def _symmetric_uniform(limit: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)
    return init
