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
    the band moves (17 x 17 crops for a 32x32 grid and a 16 window, instead of 1024), and installed in
    the cache when the window moves;
  * the window's codes before p: when the window moves they are run in chunks of up to `prefill_chunk`
    tokens on top of the installed condition; while the window stays put (the first window // 2 + 1 and
    the last window // 2 columns of every row, the whole top and bottom bands) each new code costs one
    token. Each forward call reads all the weights once, so a few large chunks beat many small ones
    (README, Benchmarks).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.models.checks import check_codes
from vqgan_jax.sampling.cache import decoder, empty_cache, forward, install, set_length
from vqgan_jax.sampling.filters import draw, filter_logits


def window_start(k: int, size: int, window: int) -> int:
    """The first row (column) of the window that samples row (column) k of a grid of `size`."""
    half = window // 2
    if k <= half:
        local = k
    elif size - k < half:
        local = window - (size - k)
    else:
        local = half
    return k - local


def placement(shape, window: int):
    """Static tables: row_start [H], col_start [W] (window origins) and, in raster order, moved [H * W]
    (the window differs from the previous position's)."""
    h, w = shape
    rows = np.array([window_start(i, h, window) for i in range(h)])
    cols = np.array([window_start(j, w, window) for j in range(w)])
    starts = [(r, c) for r in rows for c in cols]
    moved = np.array([k == 0 or starts[k] != starts[k - 1] for k in range(len(starts))])
    return rows, cols, moved


def chunk_sizes(window: int, prefill_chunk: int) -> tuple[int, int]:
    """(big, small): a moved window's codes [0, p) run as whole chunks of `big` tokens, then the rest in
    chunks of `small` (the last one padded)."""
    big = min(prefill_chunk, window * window - 1)
    return big, max(1, min(window, big // 4))


@partial(jax.jit, static_argnames=("gpt", "shape", "window", "top_k", "use_top_p", "greedy", "grid_cond",
                                   "prefill_chunk"))
def _sample_windowed(gpt, params, cond, init, mask, rng, temperature, top_p, *, shape, window, top_k,
                     use_top_p, greedy, grid_cond, prefill_chunk):
    dec = decoder(gpt)
    h, w = shape
    b = init.shape[0]
    area = window * window
    rows, cols, moved = placement(shape, window)
    n_cols = int(cols.max()) + 1 if grid_cond else 1  # distinct window columns (one prefix without a grid)
    rows, cols, moved = jnp.asarray(rows), jnp.asarray(cols), jnp.asarray(moved)
    n = area if grid_cond else cond.shape[1]

    def prefixes(row0):
        """Keys/values and next-code logits of the condition for every window column: leaves
        [n_cols, B, heads, n, head_dim], logits [n_cols, B, V]."""
        if grid_cond:
            band = jax.lax.dynamic_slice_in_dim(cond, row0, window, axis=1)
            tokens = jnp.stack([band[:, :, c:c + window].reshape(b, area) for c in range(n_cols)])
        else:
            tokens = cond[None]
        # A decoder whose cache holds just the n condition positions: attention over n keys, not over a
        # block_size cache half of which is masked (the prefixes are the sampler's largest forward calls).
        short = decoder(gpt, block_size=n)
        short_params = dict(params, pos_emb=params["pos_emb"][:, :n])
        logits, cache = forward(short, short_params, empty_cache(short, n_cols * b), tokens.reshape(n_cols * b, n))
        kv = jax.tree.map(lambda a: a.reshape(n_cols, b, *a.shape[1:]) if a.ndim else a, cache)
        return kv, logits[:, -1].reshape(n_cols, b, -1)

    big, small = chunk_sizes(window, prefill_chunk)

    def prefill(cache, band, band_logits, col, window_codes, p):
        """Installs the condition of window column `col`, runs the window's codes [0, p) on it -> (cache of
        length n + p, logits predicting code p). Whole `big` chunks first, then the rest in `small` ones:
        less padding than `big` chunks alone, far fewer calls than `small` ones."""
        cache = install(cache, jax.tree.map(lambda a: a[col] if a.ndim else a, band), n)

        def run(cache, last, first, end, size):
            """Codes [first, end) in chunks of `size`, the last one padded with the codes after them."""
            def body(c, carry):
                cache, last = carry
                # Clamped so that no chunk runs past window position area - 2 (the last any code needs):
                # the cache never needs more than n + area - 1 slots. A clamped chunk recomputes positions
                # of the one before: same tokens, same keys and values.
                start = jnp.minimum(first + c * size, area - 1 - size)
                tokens = jax.lax.dynamic_slice_in_dim(window_codes, start, size, axis=1)
                logits, cache = forward(dec, params, set_length(cache, n + start), tokens)
                # The chunk that holds code p - 1 gives the prediction of code p.
                holds = (start <= p - 1) & (p - 1 < start + size)
                return cache, jnp.where(holds, logits[:, jnp.clip(p - 1 - start, 0, size - 1)], last)
            return jax.lax.fori_loop(0, (end - first + size - 1) // size, body, (cache, last))

        cut = p // big * big
        cache, last = run(cache, band_logits[col], 0, cut, big)
        cache, last = run(cache, last, cut, p, small)
        return set_length(cache, n + p), last  # codes from p on, run as padding, lie beyond the length

    def position(k, carry):
        grid, cache, band, band_logits, last = carry
        i, j = k // w, k % w
        row0, col0 = rows[i], cols[j]
        # A new row band: the condition prefixes move with it.
        new_band = grid_cond & (j == 0) & ((i == 0) | (row0 != rows[jnp.maximum(i - 1, 0)]))
        band, band_logits = jax.lax.cond(new_band, lambda: prefixes(row0), lambda: (band, band_logits))
        p = (i - row0) * window + (j - col0)
        window_codes = jax.lax.dynamic_slice(grid, (0, row0, col0), (b, window, window)).reshape(b, area)

        def step():
            # Same window: append the code just drawn (at window position p - 1).
            token = jax.lax.dynamic_slice_in_dim(window_codes, p - 1, 1, axis=1)
            logits, new = forward(dec, params, cache, token)
            return new, logits[:, -1]

        cache, logits = jax.lax.cond(moved[k], lambda: prefill(cache, band, band_logits, col0 if grid_cond else 0,
                                                               window_codes, p), step)
        token = draw(jax.random.fold_in(rng, k), filter_logits(logits, temperature, top_k,
                                                              top_p if use_top_p else None), greedy)
        token = jnp.where(mask[:, i, j], token, grid[:, i, j])
        return grid.at[:, i, j].set(token), cache, band, band_logits, logits

    band, band_logits = prefixes(jnp.int32(0))
    cache = empty_cache(dec, b)
    carry = (init, cache, band, band_logits, jnp.zeros((b, gpt.vocab_size), jnp.float32))
    return jax.lax.fori_loop(0, h * w, position, carry)[0]


def sample_windowed(gpt, params, cond, shape, rng, window: int = 16, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, greedy: bool = False, init=None,
                    mask=None, prefill_chunk: int = 64):
    """Samples an H x W code grid with a sliding window x window attention window, in one jitted program.

    cond: int [B, H, W] conditioning codes (segmentation, depth: cropped with the window and placed before
      the window's codes, as the original's sample_conditional.py), or int [B, n] tokens placed before
      every window (class label, SOS).
    shape: (H, W), each >= window. init / mask: optional int [B, H, W] codes and bool [B, H, W]: only the
      codes where mask is True are drawn, the others are kept from init (in- and out-painting).
    temperature, top_k, top_p, greedy: as `sample`.
    prefill_chunk: the largest number of tokens per forward call when a moved window's codes are run (a
      speed knob only: the samples are the same).
    -> int32 [B, H, W].
    """
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
    if h < window or w < window:
        raise ValueError(f"the grid {shape} is smaller than the window {window}: use sample")
    n = window * window if grid_cond else cond.shape[1]
    if n + window * window - 1 > gpt.block_size:
        raise ValueError(f"{n} condition tokens + a {window}x{window} window exceed block_size={gpt.block_size}")
    b = cond.shape[0]
    init = jnp.zeros((b, h, w), jnp.int32) if init is None else jnp.asarray(init)
    mask = jnp.ones((b, h, w), bool) if mask is None else jnp.asarray(mask, bool)
    check_codes(init, gpt.vocab_size, "init")
    if init.shape != (b, h, w) or mask.shape != (b, h, w):
        raise ValueError(f"init and mask must be [B, H, W] = {(b, h, w)}, got {tuple(init.shape)} and {tuple(mask.shape)}")
    return _sample_windowed(gpt, params, cond.astype(jnp.int32), init.astype(jnp.int32), mask, rng,
                            jnp.float32(temperature), jnp.float32(top_p or 1.0), shape=shape, window=window,
                            top_k=top_k, use_top_p=top_p is not None, greedy=greedy, grid_cond=grid_cond,
                            prefill_chunk=int(prefill_chunk))
