"""A decoding step of the GPT (t new tokens per sequence) as a plain function over transposed weights.

Why not the GPT module itself: a decoding step multiplies a handful of rows (the batch) by every weight
matrix. XLA:CPU hands x [B, K] @ W [K, N] to Eigen, whose kernel is built for many rows and is slow with
8; the same product written W^T [N, K] @ x^T [K, B] runs 1.3x faster (8 [512, 2048] layers at B = 8 on
a 2-core CPU: 6.6 -> 5.0 ms). XLA folds a transpose next to a dot back into the dot, so the step keeps
its activations feature-major ([C, B]) from the token embedding to the logits, and `prepare` transposes
the weights once per sampling call, outside the decoding loop (a gpt_sample step: 23.5 -> 19.9 ms).
The arithmetic is the module's (same LayerNorm, GELU, masking and scaling; products, keys and values in
the GPT's compute dtype, the residual stream and normalisation statistics in float32); the cache is the
module's too (`decoder(gpt).init(...)["cache"]`), so the prefix can be filled by the
module and the steps run here.
"""
import os

import jax
import jax.numpy as jnp

from vqgan_jax.models.gpt import attention_bias, gelu


def matmul_parts() -> int:
    """Row blocks per weight matrix: on CPU one per core (at most 8), so that XLA runs the blocks'
    products side by side (one product of 8 columns runs on one core: a gpt_sample step's weight
    products 9.4 -> 6.4 ms with 2 blocks on 2 cores); elsewhere 1."""
    if jax.default_backend() != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 8))


def prepare(gpt, params, parts: int | None = None) -> dict:
    """The GPT's params -> the step's weights: each matrix as [out, in] cut into `parts` row blocks
    (default `matmul_parts()`), query/key/value stacked into one [3C, C] product, vectors as columns
    [n, 1]. Matrices and their biases in the GPT's compute dtype, as its Dense layers use them (the head
    in float32, as the GPT's)."""
    parts = matmul_parts() if parts is None else parts

    def matrix(w, dtype=gpt.dtype):
        w = jnp.asarray(w, dtype).T
        return jnp.array_split(w, min(parts, w.shape[0]))

    def col(v, dtype=None):
        return jnp.asarray(v, dtype)[:, None]

    def bias(v):
        return col(v, gpt.dtype)

    def norm(p):
        return col(p["scale"]), col(p["bias"])

    blocks = []
    for i in range(gpt.n_layer):
        p = params[f"blocks_{i}"]
        attn = p["attn"]
        names = ("query", "key", "value")
        blocks.append({
            "ln1": norm(p["ln1"]), "ln2": norm(p["ln2"]),
            "qkv": matrix(jnp.concatenate([attn[n]["kernel"] for n in names], axis=1)),
            "qkv_bias": bias(jnp.concatenate([attn[n]["bias"] for n in names])),
            "proj": matrix(attn["proj"]["kernel"]), "proj_bias": bias(attn["proj"]["bias"]),
            "fc": matrix(p["mlp_0"]["kernel"]), "fc_bias": bias(p["mlp_0"]["bias"]),
            "out": matrix(p["mlp_2"]["kernel"]), "out_bias": bias(p["mlp_2"]["bias"]),
        })
    return {"blocks": blocks, "tok_emb": params["tok_emb"]["embedding"], "pos_emb": params["pos_emb"][0],
            "ln_f": norm(params["ln_f"]), "head": matrix(params["head"]["kernel"], jnp.float32)}


def _mul(blocks, x, contract: int = 0):
    """[out, in] matrix (as row blocks) times x: [in, n] (contract=0) or [n, in] (contract=1) -> [out, n],
    in the matrix's dtype."""
    x = x.astype(blocks[0].dtype)
    return jnp.concatenate([jax.lax.dot_general(w, x, (((1,), (contract,)), ((), ()))) for w in blocks])


def _layer_norm(x, scale, bias, dtype, eps=1e-5):
    """x: [C, B], normalised over C as the GPT's LayerNorm: the input in `dtype`, statistics in float32,
    the output in `dtype`."""
    x = x.astype(dtype).astype(jnp.float32)
    mean = jnp.mean(x, axis=0, keepdims=True)
    centred = x - mean
    var = jnp.mean(centred * centred, axis=0, keepdims=True)
    return (centred * jax.lax.rsqrt(var + eps) * scale + bias).astype(dtype)


def _attention(w, layer_cache, h, pos, b: int, n_head: int, n_unmasked: int):
    """h: [C, B * t] normalised input at positions pos.. pos + t - 1 -> ([C, B * t] attention output, the
    layer's cache with their keys and values written)."""
    c = h.shape[0]
    t, hd = h.shape[1] // b, c // n_head
    qkv = _mul(w["qkv"], h) + w["qkv_bias"]
    q, k, v = (a.reshape(n_head, hd, b, t).transpose(2, 0, 3, 1) for a in jnp.split(qkv, 3))  # [B, H, t, hd]
    keys = jax.lax.dynamic_update_slice(layer_cache["cached_key"], k, (0, 0, pos, 0))
    values = jax.lax.dynamic_update_slice(layer_cache["cached_value"], v, (0, 0, pos, 0))
    bias = attention_bias(pos + jnp.arange(t), jnp.arange(keys.shape[2]), n_unmasked, h.dtype)
    q = q * jnp.asarray(1.0 / hd ** 0.5, q.dtype)
    att = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, keys) + bias, axis=-1)
    # y as [B * t, C], multiplied from the left by proj (the product contracts both on their last axis):
    # asking the einsum for [C, B * t] makes XLA transpose the whole value cache every step.
    y = jax.lax.dot_general(values, att, (((2,), (3,)), ((0, 1), (0, 1))))  # [B, H, hd, t]
    y = y.transpose(0, 3, 1, 2).reshape(b * t, c)
    y = _mul(w["proj"], y, contract=1)
    cache = dict(layer_cache, cached_key=keys, cached_value=values, cache_index=pos + t)
    return y + w["proj_bias"], cache


def step(gpt, weights, cache, tokens):
    """tokens: int32 [B, t] at the cache's position -> (logits [B, t, V], the cache advanced by t).
    weights: `prepare(gpt, params)`; cache: the decoding GPT's (`vqgan_jax.sampling.cache`)."""
    b, t = tokens.shape
    pos = cache["position"]
    x = weights["tok_emb"][tokens] + jax.lax.dynamic_slice_in_dim(weights["pos_emb"], pos, t)
    x = x.reshape(b * t, -1).T  # [C, B * t]
    cache = dict(cache, position=pos + t)
    for i, w in enumerate(weights["blocks"]):
        name = f"blocks_{i}"
        a, layer_cache = _attention(w, cache[name]["attn"], _layer_norm(x, *w["ln1"], gpt.dtype), pos, b,
                                    gpt.n_head, gpt.n_unmasked)
        cache[name] = dict(cache[name], attn=layer_cache)
        x = x + a
        h = gelu(_mul(w["fc"], _layer_norm(x, *w["ln2"], gpt.dtype)) + w["fc_bias"])
        x = x + (_mul(w["out"], h) + w["out_bias"])
    logits = _mul(weights["head"], _layer_norm(x, *weights["ln_f"], gpt.dtype))  # [V, B * t]
    return logits.T.reshape(b, t, -1), cache
