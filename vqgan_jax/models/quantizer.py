"""Vector quantisation with a straight-through estimator (taming's `VectorQuantizer2`), plus the codebook
options of later work, all off by default: l2-normalised search (ViT-VQGAN, LlamaGen), factorised
low-dimensional codes, and an entropy penalty on the soft assignment (MaskGIT)."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vqgan_jax.models.checks import negatives_past_end


class QuantizerOutput(NamedTuple):
    z_q: jax.Array          # [B, h, w, D] quantised latents, straight-through: gradient flows to z unchanged
    indices: jax.Array      # [B, h, w] int32 code indices, raster order
    loss: jax.Array         # [] codebook + commitment loss (+ entropy penalty)
    perplexity: jax.Array   # [] exp(entropy) of the code histogram of this batch
    usage: jax.Array        # [] fraction of the codebook used in this batch
    latents: jax.Array      # [B, h, w, code_dim] float32: the encoder's output as searched (projected, normalised)


def codebook_stats(indices: jax.Array, n_embed: int) -> tuple[jax.Array, jax.Array]:
    """indices: int array of any shape -> (perplexity, fraction of the `n_embed` codes that occur)."""
    counts = jnp.bincount(indices.reshape(-1), length=n_embed)
    probs = counts / indices.size
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
    return perplexity, jnp.mean(counts > 0)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / ||x|| along the last axis (PyTorch's F.normalize: the norm is floored at `eps`)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def entropy_penalty(affinity: jax.Array, temperature: float) -> jax.Array:
    """affinity: [N, K] (negative distances) -> mean per-position entropy of softmax(affinity / T) minus the
    entropy of its mean over positions. Minimising it makes each assignment confident while the batch as a
    whole spreads over many codes."""
    log_p = jax.nn.log_softmax(affinity.astype(jnp.float32) / temperature, axis=-1)
    p = jnp.exp(log_p)
    per_position = -jnp.mean(jnp.sum(p * log_p, axis=-1))
    mean_p = jnp.mean(p, axis=0)
    batch = -jnp.sum(mean_p * jnp.log(mean_p + 1e-10))
    return per_position - batch


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation by squared distance.

    loss = commitment + codebook, each a mean squared error with one side under `stop_gradient`; `beta`
    weighs the commitment term (the encoder pulled toward its code), or, with `legacy=True`, the codebook
    term: the original's long-standing placement, with which every released checkpoint was trained.

    Options (defaults = the original): `codebook_dim` > 0 projects the latent to that many dimensions for
    the search (`in_proj`) and the chosen code back to `embed_dim` (`out_proj`); `l2_normalize` searches
    and quantises unit vectors, so the nearest code is the cosine-nearest; `entropy_weight` adds that
    multiple of `entropy_penalty` over the codes' soft assignment at `entropy_temperature`.
    """
    n_embed: int
    embed_dim: int
    beta: float = 0.25
    legacy: bool = True
    l2_normalize: bool = False
    codebook_dim: int = 0
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01

    @property
    def code_dim(self) -> int:
        return self.codebook_dim or self.embed_dim

    def setup(self):
        self.embedding = nn.Embed(
            self.n_embed, self.code_dim, name="embedding",
            embedding_init=_symmetric_uniform(1.0 / self.n_embed))
        if self.codebook_dim:
            self.in_proj = nn.Dense(self.codebook_dim, name="in_proj")
            self.out_proj = nn.Dense(self.embed_dim, name="out_proj")

    def codes(self) -> jax.Array:
        """[n_embed, code_dim]: the codebook as the search sees it (unit rows with `l2_normalize`)."""
        codebook = self.embedding.embedding
        return l2_normalize(codebook) if self.l2_normalize else codebook

    def __call__(self, z) -> QuantizerOutput:
        """z: [B, h, w, embed_dim]."""
        codebook = self.codes()
        h = self.in_proj(z.astype(jnp.float32)) if self.codebook_dim else z.astype(jnp.float32)
        if self.l2_normalize:
            h = l2_normalize(h)
        flat = h.reshape(-1, self.code_dim)
        # HIGHEST precision: TF32/bf16 matmuls on accelerators would otherwise flip near-tie indices.
        dots = jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
        dist = jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1) - 2 * dots
        indices = jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(z.shape[:-1])

        h_q = jnp.take(codebook, indices, axis=0)
        commitment = jnp.mean((jax.lax.stop_gradient(h_q) - h) ** 2)
        codebook_term = jnp.mean((h_q - jax.lax.stop_gradient(h)) ** 2)
        if self.legacy:
            loss = commitment + self.beta * codebook_term
        else:
            loss = self.beta * commitment + codebook_term
        if self.entropy_weight:
            loss = loss + self.entropy_weight * entropy_penalty(-dist, self.entropy_temperature)

        # Straight through from the searched latent `h`, so that with `l2_normalize` the gradient passes
        # through the normalisation (as LlamaGen's), not around it.
        z_q = h + jax.lax.stop_gradient(h_q - h)
        z_q = (self.out_proj(z_q) if self.codebook_dim else z_q).astype(z.dtype)
        perplexity, usage = codebook_stats(indices, self.n_embed)
        return QuantizerOutput(z_q, indices, loss, perplexity, usage, h)

    def lookup(self, indices):
        """indices: [B, h, w] int -> [B, h, w, embed_dim] the latents the decoder receives for these codes."""
        h_q = jnp.take(self.codes(), negatives_past_end(indices, self.n_embed), axis=0)
        return self.out_proj(h_q) if self.codebook_dim else h_q


def _symmetric_uniform(limit: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -limit, limit)
    return init
