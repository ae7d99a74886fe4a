"""The second stage's sequence model (the original's `Net2NetTransformer`): conditioning tokens followed by
image codes, one shared vocabulary, next-token cross-entropy over the image codes only.

Conditioning kinds (`cond_stage.kind`), each giving int32 tokens [B, n]:
  "sos"           one constant token (unconditional; the original's SOSProvider)
  "class"         the class label as one token (the original's Labelator)
  "coord"         the crop's pixel positions over the resized image, area-pooled by `down_factor` and
                  quantised to round(n_embed * position) (the original's CoordStage, FacesHQ)
  "segmentation"  the codes of a second VQGAN over the one-hot label map (VQSegmentationModel)
  "depth"         the codes of a second VQGAN over a one-channel depth map
"""

from typing import Any

import jax
import jax.numpy as jnp

from vqgan_jax.models.checks import check_codes

COND_KINDS = ("sos", "class", "coord", "segmentation", "depth")
VQ_COND_KINDS = ("segmentation", "depth")


def coord_tokens(crop, size: int, n_embed: int, down_factor: int):
    """crop: int [B, 4] = (top, left, resized height, resized width) of each size x size crop
    -> int32 [B, (size // down_factor) ** 2] in [0, n_embed].

    The position map is (row * width + column) / (height * width) over the resized image, as the
    original's FacesHQ `coord`, cropped, then averaged over down_factor x down_factor cells."""
    if size % down_factor:
        raise ValueError(f"coord conditioning: crop size {size} is not a multiple of down_factor {down_factor}")
    crop = jnp.asarray(crop, jnp.float32)
    top, left, height, width = (crop[:, i, None, None] for i in range(4))
    rows = top + jnp.arange(size, dtype=jnp.float32)[None, :, None]
    cols = left + jnp.arange(size, dtype=jnp.float32)[None, None, :]
    positions = (rows * width + cols) / (height * width)
    g = size // down_factor
    pooled = positions.reshape(-1, g, down_factor, g, down_factor).mean(axis=(2, 4))
    return jnp.round(n_embed * jnp.clip(pooled, 0.0, 1.0)).astype(jnp.int32).reshape(-1, g * g)


def image_codes(vq, vq_params, images):
    """images: [B, H, W, C] in [-1, 1] (or one-hot maps) -> code indices int32 [B, h * w], raster order."""
    _, indices, _ = vq.apply({"params": vq_params}, images, method=vq.encode)
    return indices.reshape(indices.shape[0], -1).astype(jnp.int32)


def cond_tokens(cond_config, batch, cond_vq=None, cond_params=None):
    """The conditioning tokens [B, n] int32 for one batch (see the module docstring for the kinds)."""
    kind = cond_config.kind
    b = next(iter(batch.values())).shape[0]
    if kind == "sos":
        return jnp.full((b, 1), cond_config.sos_token, jnp.int32)
    if kind == "class":
        return jnp.asarray(batch["label"], jnp.int32).reshape(b, 1)
    if kind == "coord":
        size = batch["image"].shape[1]
        return coord_tokens(batch["crop"], size, cond_config.n_embed, cond_config.down_factor)
    if kind == "segmentation":
        onehot = jax.nn.one_hot(batch["segmentation"], cond_vq.in_channels, dtype=jnp.float32)
        return image_codes(cond_vq, cond_params, onehot)
    if kind == "depth":
        return image_codes(cond_vq, cond_params, batch["depth"])
    raise ValueError(f"unknown cond_stage.kind {kind!r}: use one of {COND_KINDS}")


def null_token(gpt) -> int:
    """The token that replaces a dropped condition: the vocabulary's last entry, which must be left unused
    by the codebooks (make vocab_size one larger than them)."""
    return gpt.vocab_size - 1


def sequence_logits(gpt, params, codes, cond, rng, *, pkeep: float = 1.0, cond_drop: float = 0.0,
                    train: bool = False) -> tuple[jax.Array, Any]:
    """codes: int [B, L] image codes; cond: int [B, n] -> logits [B, L, vocab] predicting each code from
    the condition and the codes before it.

    Training corruptions, as the original: with probability 1 - pkeep each input code (not target) is
    replaced by a uniformly random token. With probability cond_drop a whole example's condition becomes
    `null_token` tokens, so that the model also learns the unconditional distribution (classifier-free
    guidance at sampling time)."""
    k_keep, k_random, k_drop, k_dropout = jax.random.split(rng, 4)
    check_codes(codes, gpt.vocab_size, "image codes")
    inputs = codes
    if train and pkeep < 1.0:
        keep = jax.random.bernoulli(k_keep, pkeep, codes.shape)
        inputs = jnp.where(keep, codes, jax.random.randint(k_random, codes.shape, 0, gpt.vocab_size))
    if train and cond_drop > 0.0:
        drop = jax.random.bernoulli(k_drop, cond_drop, (cond.shape[0], 1))
        cond = jnp.where(drop, null_token(gpt), cond)
    sequence = jnp.concatenate([cond.astype(jnp.int32), inputs.astype(jnp.int32)], axis=1)
    logits = gpt.apply({"params": params}, sequence[:, :-1], train=train, rngs={"dropout": k_dropout})
    # Output i predicts sequence position i + 1: the image codes start at the condition's last output.
    return logits[:, cond.shape[1] - 1:], codes


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy in nats; logits [B, L, V] (any float dtype), targets int [B, L]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1))
