"""KV-cached autoregressive sampling as one compiled program: the condition (and any given codes) fill the
cache in one forward pass, then `lax.fori_loop`s draw one code per iteration and append it to the
preallocated cache in place. Shapes are static, so nothing recompiles from one step to the next.

The loop is cut into SEGMENTS pieces, each with a cache only as long as the positions it reaches: every
step's attention reads the whole cache it is given, masked or not, and at batch 8 reading keys and values
costs as much as the weights (8 of the 28 ms of a gpt_sample step at 257 positions, on a 2-core CPU).
The steps run `step.step` (the GPT with transposed weights, activations feature-major), compiled with
YNNPACK for dots on CPU (`xla_flags.decode_compiler_options`)."""

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.models.checks import check_codes
from vqgan_jax.sampling.cache import empty_cache, forward, grow, shortened
from vqgan_jax.sampling.filters import check_filters, check_rng, draw, filter_logits
from vqgan_jax.sampling.step import prepare, step
from vqgan_jax.xla_flags import decode_compiler_options


def null_condition(gpt, cond):
    """The condition of the unconditional branch of classifier-free guidance: the null token (the
    vocabulary's last entry, see vqgan_jax.net2net) in every position."""
    return jnp.full_like(cond, gpt.vocab_size - 1)


def guide(logits, scale):
    """logits: [2B, V], conditional rows first -> [B, V] = uncond + scale * (cond - uncond)."""
    cond, uncond = jnp.split(logits, 2, axis=0)
    return uncond + scale * (cond - uncond)


SEGMENTS = 4


def segment_lengths(prefix: int, total: int, segments: int = SEGMENTS) -> list[int]:
    """Cache lengths of the decoding loop's pieces for a `prefix` run in one pass and `total` positions in
    all: the multiples of ceil(total / segments) from the first that holds the prefix, then total."""
    chunk = -(-total // segments)
    return sorted({min(n, total) for n in range(-(-prefix // chunk) * chunk, total + chunk, chunk)})


def _sample(gpt, params, cond, given, rng, temperature, top_p, cfg_scale, *, steps, top_k, use_top_p, greedy,
            guided, num_codes):
    b, n_cond, m = cond.shape[0], cond.shape[1], given.shape[1]
    out = jnp.zeros((b, steps), jnp.int32).at[:, :m].set(given)
    if m == steps:
        return out
    prefix = jnp.concatenate([cond, given], axis=1)
    if guided:
        prefix = jnp.concatenate([prefix, jnp.concatenate([null_condition(gpt, cond), given], axis=1)])
    # The GPT reads the condition and every code but the last: code t sits at position n_cond + t.
    lengths = segment_lengths(prefix.shape[1], n_cond + steps - 1)
    dec, dec_params = shortened(gpt, params, lengths[0])
    logits, cache = forward(dec, dec_params, empty_cache(dec, prefix.shape[0]), prefix)

    def pick(t, last):
        last = guide(last, cfg_scale) if guided else last
        last = filter_logits(last, temperature, top_k, top_p if use_top_p else None, num_codes)
        return draw(jax.random.fold_in(rng, t), last, greedy)

    weights = prepare(gpt, params)

    def body(t, carry):
        cache, last, out = carry
        token = pick(t, last)
        out = out.at[:, t].set(token)
        logits, cache = step(gpt, weights, cache, jnp.tile(token, 2 if guided else 1)[:, None])
        return cache, logits[:, -1], out

    carry, first = (cache, logits[:, -1], out), m
    for n in lengths:  # codes t < n - n_cond fit a cache of n positions
        carry = (grow(carry[0], n),) + carry[1:]
        end = min(n - n_cond, steps - 1)
        carry, first = jax.lax.fori_loop(first, end, body, carry), end
    _, last, out = carry
    return out.at[:, steps - 1].set(pick(steps - 1, last))


_sample = jax.jit(_sample, static_argnames=("gpt", "steps", "top_k", "use_top_p", "greedy", "guided", "num_codes"),
                  compiler_options=decode_compiler_options())


def sample(gpt, params, cond, steps: int, rng, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, greedy: bool = False, given=None, cfg_scale: float = 1.0,
           num_codes: int | None = None):
    """Draws `steps` codes after the condition, with the GPT's KV cache, in one jitted program.

    gpt: the GPT module (decoding mode is switched on here); params its parameters.
    cond: int [B, n] condition tokens placed before the codes (a class label, an SOS token, coordinate or
      segmentation codes); n >= 1.
    given: optional int [B, m], m <= steps: the first m codes, kept (image completion); the rest are drawn.
    temperature, top_k (keep the k most likely), top_p (nucleus; usable with or without top_k), greedy
      (argmax; the filters then change nothing). cfg_scale != 1: classifier-free guidance against the
      null condition, for models trained with cond_drop (the batch runs twice).
    num_codes: draw only codes [0, num_codes), the first stage's codebook, where the vocabulary is larger
      (condition tokens, cond_drop's null token); None: the whole vocabulary, as the original.
    -> int32 [B, steps] codes in raster order (reshape to the code grid, decode with the VQGAN).
    """
    if not (isinstance(steps, (int, np.integer)) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not np.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
    check_rng(rng)
    cond = jnp.asarray(cond)
    given = jnp.zeros((cond.shape[0], 0), jnp.int32) if given is None else jnp.asarray(given)
    check_codes(cond, gpt.vocab_size, "cond")
    check_codes(given, gpt.vocab_size, "given codes")
    if cond.ndim != 2 or cond.shape[1] < 1:
        raise ValueError(f"cond must be int [B, n] with n >= 1 tokens, got shape {tuple(cond.shape)}")
    if given.ndim != 2 or given.shape[0] != cond.shape[0] or given.shape[1] > steps:
        raise ValueError(f"given must be int [B, m] with B = {cond.shape[0]} and m <= steps = {steps}, "
                         f"got shape {tuple(given.shape)}")
    if cond.shape[1] + steps - 1 > gpt.block_size:
        raise ValueError(f"{cond.shape[1]} condition tokens + {steps} codes exceed block_size={gpt.block_size}; "
                         f"sample larger grids with sample_windowed")
    check_filters(temperature, top_k, top_p, num_codes, gpt.vocab_size)
    return _sample(gpt, params, cond.astype(jnp.int32), given.astype(jnp.int32), rng,
                   jnp.float32(temperature), jnp.float32(top_p or 1.0), jnp.float32(cfg_scale), steps=steps,
                   top_k=top_k, use_top_p=top_p is not None, greedy=greedy, guided=cfg_scale != 1.0,
                   num_codes=num_codes)
