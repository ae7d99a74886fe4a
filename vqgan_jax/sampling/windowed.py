"""Sliding-window sampling of code grids larger than the GPT's window, as one jitted program.

Window placement is the original's (scripts/sample_conditional.py): for the code at (i, j) the window
starts at i - li, j - lj with li = i near the top, window - (H - i) near the bottom and window // 2 in
between (the same for columns), so the window always lies inside the grid. The model sees the
condition (the conditioning grid cropped with the window, or a fixed token prefix) followed by the
window's codes in raster order, and predicts the code at the window position p = li * window + lj.

What is computed once instead of once per position (the original runs the whole 2 * window**2 - 1 token
sequence for every code):
  * the condition's keys and values: they depend on the condition crop alone (it comes first and
    attention is causal), so they are computed for every window column of a row band at once, whenever
    the band moves (17 x 17 crops for a 32x32 grid and a 16 window, instead of 1024);
  * the window's codes: every window column of the current band keeps its own cache (condition, then the
    window's codes in raster order). A position runs only the codes its column's cache lacks, those drawn
    since the column was last used: one token while the window stays put, window // 2 at the middle
    columns, one row's worth when a band that stays put (the top and bottom ones) comes back to a column.
    They run in chunks of `prefill_chunk`, then window // 2, then 1 token: each forward call reads all the
    weights once, so few calls beat many (README, Benchmarks). The chunks go through `step.step` (weights
    transposed once per call; 6% faster than the module on a 20x32 grid).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.models.checks import check_codes
from vqgan_jax.sampling.cache import decoder, empty_cache, forward, install, set_length, shortened
from vqgan_jax.sampling.filters import check_filters, check_rng, draw, filter_logits
from vqgan_jax.sampling.step import prepare, step
from vqgan_jax.xla_flags import decode_compiler_options


def window_start(k: int, size: int, window: int) -> int:
    """The first row (column) of the window that samples row (column) k of a grid of `size`."""
    half = window // 2
    if k <= half:
        local = k
    elif size - k < half:
        local = window - (size - k)
    else:
        local = half
    # The original's rule overruns the grid by one at k = size - half when the window is odd (it is used
    # with even windows); clamped, so that the window always lies inside. Even windows never reach it.
    return min(k - local, size - window)


def placement(shape, window: int):
    """Static tables: row_start [H] and col_start [W], the window origins."""
    h, w = shape
    return (np.array([window_start(i, h, window) for i in range(h)]),
            np.array([window_start(j, w, window) for j in range(w)]))


def chunk_sizes(window: int, prefill_chunk: int) -> tuple[int, ...]:
    """The chunk sizes, largest first, in which a column's missing codes run: as many whole chunks of each
    as fit, so that every code runs exactly once and no chunk is padded."""
    big = min(prefill_chunk, window * window - 1)
    return tuple(sorted({big, min(big, max(1, window // 2)), 1}, reverse=True))


@partial(jax.jit, static_argnames=("gpt", "shape", "window", "top_k", "use_top_p", "greedy", "grid_cond",
                                   "prefill_chunk", "num_codes"), compiler_options=decode_compiler_options())
def _sample_windowed(gpt, params, cond, init, mask, rng, temperature, top_p, *, shape, window, top_k,
                     use_top_p, greedy, grid_cond, prefill_chunk, num_codes):
    dec = decoder(gpt)
    h, w = shape
    b = init.shape[0]
    area = window * window
    rows, cols = placement(shape, window)
    n_cols = int(cols.max()) + 1  # distinct window columns
    rows, cols = jnp.asarray(rows), jnp.asarray(cols)
    n = area if grid_cond else cond.shape[1]
    sizes = chunk_sizes(window, prefill_chunk)

    def prefixes(row0):
        """Keys/values and next-code logits of the condition for every window column: leaves
        [n_cols * B, heads, n, head_dim] (column-major), logits [n_cols, B, V]."""
        if grid_cond:
            band = jax.lax.dynamic_slice_in_dim(cond, row0, window, axis=1)
            tokens = jnp.concatenate([band[:, :, c:c + window].reshape(b, area) for c in range(n_cols)])
        else:
            tokens = cond
        # A decoder whose cache holds just the n condition positions: attention over n keys, not over a
        # block_size cache half of which is masked (the prefixes are the sampler's largest forward calls).
        short, short_params = shortened(gpt, params, n)
        logits, kv = forward(short, short_params, empty_cache(short, tokens.shape[0]), tokens)
        logits = logits[:, -1].reshape(-1, b, logits.shape[-1])
        if not grid_cond:  # the same prefix for every column
            kv = jax.tree.map(lambda a: jnp.tile(a, (n_cols,) + (1,) * (a.ndim - 1)) if a.ndim else a, kv)
            logits = jnp.broadcast_to(logits, (n_cols, *logits.shape[1:]))
        return kv, logits

    def column(caches, c):
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, c * b, b) if a.ndim else a, caches)

    def store(caches, c, cache):
        return jax.tree.map(lambda a, x: jax.lax.dynamic_update_slice_in_dim(a, x, c * b, 0) if a.ndim else a,
                            caches, cache)

    weights = prepare(gpt, params)

    def catch_up(cache, last, window_codes, first, end):
        """Runs window codes [first, end) on a cache holding n + first positions -> (cache, logits
        predicting code `end`; `last` when there is nothing to run)."""
        for size in sizes:
            def body(_, carry, size=size):
                cache, last, start = carry
                tokens = jax.lax.dynamic_slice_in_dim(window_codes, start, size, axis=1)
                logits, cache = step(gpt, weights, cache, tokens)
                return cache, logits[:, -1], start + size
            cache, last, first = jax.lax.fori_loop(0, (end - first) // size, body, (cache, last, first))
        return cache, last

    def position(i, j, carry):
        grid, caches, lengths, band_logits = carry
        row0, col0 = rows[i], cols[j]
        p = (i - row0) * window + (j - col0)
        window_codes = jax.lax.dynamic_slice(grid, (0, row0, col0), (b, window, window)).reshape(b, area)
        # The column's cache holds its codes [0, lengths[col0]); the rest up to p were drawn since.
        cache = set_length(column(caches, col0), n + lengths[col0])
        cache, logits = catch_up(cache, band_logits[col0], window_codes, lengths[col0], p)
        logits = filter_logits(logits, temperature, top_k, top_p if use_top_p else None, num_codes)
        token = draw(jax.random.fold_in(rng, i * w + j), logits, greedy)
        token = jnp.where(mask[:, i, j], token, grid[:, i, j])
        return grid.at[:, i, j].set(token), store(caches, col0, cache), lengths.at[col0].set(p), band_logits

    def row(i, carry):
        grid, caches, lengths, band_logits = carry

        def new_band():
            # Every column restarts from its condition: the window rows have moved.
            kv, logits = prefixes(rows[i]) if grid_cond else (prefix_kv, prefix_logits)
            return grid, install(caches, kv, n), jnp.zeros_like(lengths), logits

        moved = (i == 0) | (rows[i] != rows[jnp.maximum(i - 1, 0)])
        carry = jax.lax.cond(moved, new_band, lambda: carry)
        return jax.lax.fori_loop(0, w, partial(position, i), carry)

    prefix_kv, prefix_logits = (None, None) if grid_cond else prefixes(jnp.int32(0))
    caches = empty_cache(dec, n_cols * b)
    carry = (init, caches, jnp.zeros(n_cols, jnp.int32), jnp.zeros((n_cols, b, gpt.vocab_size), jnp.float32))
    return jax.lax.fori_loop(0, h, row, carry)[0]


def sample_windowed(gpt, params, cond, shape, rng, window: int = 16, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, greedy: bool = False, init=None,
                    mask=None, prefill_chunk: int = 128, num_codes: int | None = None):
    """Samples an H x W code grid with a sliding window x window attention window, in one jitted program.

    cond: int [B, H, W] conditioning codes (segmentation, depth: cropped with the window and placed before
      the window's codes, as the original's sample_conditional.py), or int [B, n] tokens placed before
      every window (class label, SOS).
    shape: (H, W), each >= window. init / mask: optional int [B, H, W] codes and bool [B, H, W]: only the
      codes where mask is True are drawn, the others are kept from init (in- and out-painting).
    temperature, top_k, top_p, greedy, num_codes: as `sample`.
    prefill_chunk: the largest number of tokens per forward call when a window column catches up on the
      codes drawn since it was last used (a speed knob only: the samples are the same).
    Memory: one block_size KV cache per distinct window column (W - window + 1 of them) and batch row.
    -> int32 [B, H, W].
    """
    if len(shape) != 2:
        raise ValueError(f"shape must be the grid's (H, W), got {shape}")
    if (init is None) != (mask is None):
        raise ValueError("init and mask go together: the mask says which of init's codes to redraw")
    check_rng(rng)
    h, w = shape = tuple(int(s) for s in shape)
    cond = jnp.asarray(cond)
    check_codes(cond, gpt.vocab_size, "cond")
    grid_cond = cond.ndim == 3
    if grid_cond and tuple(cond.shape[1:]) != shape:
        raise ValueError(f"the conditioning grid {tuple(cond.shape[1:])} must have the sampled shape {shape}")
    if not grid_cond and (cond.ndim != 2 or cond.shape[1] < 1):
        raise ValueError(f"cond must be int [B, H, W] (a grid) or [B, n] (n >= 1 tokens), got {tuple(cond.shape)}")
    if prefill_chunk < 1 or window < 2:
        raise ValueError(f"need prefill_chunk >= 1 and window >= 2, got {prefill_chunk} and {window}")
    check_filters(temperature, top_k, top_p, num_codes, gpt.vocab_size)
    if h < window or w < window:
        raise ValueError(f"the grid {shape} is smaller than the window {window}: use sample")
    n = window * window if grid_cond else cond.shape[1]
    if n + window * window - 1 > gpt.block_size:
        raise ValueError(f"{n} condition tokens + a {window}x{window} window exceed block_size={gpt.block_size}")
    b = cond.shape[0]
    init = jnp.zeros((b, h, w), jnp.int32) if init is None else jnp.asarray(init)
    mask = jnp.ones((b, h, w), bool) if mask is None else jnp.asarray(mask)
    if mask.dtype != bool:  # 0.5 would silently count as True
        raise ValueError(f"mask must be bool [B, H, W], got dtype {mask.dtype}")
    check_codes(init, gpt.vocab_size, "init")
    if init.shape != (b, h, w) or mask.shape != (b, h, w):
        raise ValueError(f"init and mask must be [B, H, W] = {(b, h, w)}, got {tuple(init.shape)} and {tuple(mask.shape)}")
    return _sample_windowed(gpt, params, cond.astype(jnp.int32), init.astype(jnp.int32), mask, rng,
                            jnp.float32(temperature), jnp.float32(top_p or 1.0), shape=shape, window=window,
                            top_k=top_k, use_top_p=top_p is not None, greedy=greedy, grid_cond=grid_cond,
                            prefill_chunk=int(prefill_chunk), num_codes=num_codes)
