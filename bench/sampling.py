"""The sampling workloads: `gpt_sample` (KV-cached sampler) and `window_sample` (sliding window).

Both run the whole draw as the one jitted program users call (`vqgan_jax.sampling`); the first call's
time is reported as compile_s (compile + one run), the median of the following calls as total_s.
"""

import statistics

import jax
import jax.numpy as jnp

from bench.run import PEAK_BANDWIDTH, device_peak
from vqgan_jax.models import GPT
from vqgan_jax.sampling import sample, sample_windowed
from vqgan_jax.sampling.sampler import segment_lengths


def _gpt(model: dict, dtype: str):
    gpt = GPT(**{k: v for k, v in model.items() if k != "dropout"}, dtype=jnp.dtype(dtype))
    params = jax.jit(gpt.init)(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    return gpt, params


def _time(fn, repeats):
    import time

    def once():
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t0

    first = once()
    times = [once() for _ in range(repeats)]
    return first, statistics.median(times), times


def bench_gpt_sample(spec: dict, workloads: dict, repeats: int, dtype: str) -> dict:
    model = workloads[spec["model"].split(".")[0]]["model"] if isinstance(spec["model"], str) else spec["model"]
    gpt, params = _gpt(model, dtype)
    b, steps = spec["batch"], spec["steps"]
    cond = jnp.full((b, 1), 7, jnp.int32)  # one class token
    first, total, times = _time(lambda: sample(gpt, params, cond, steps=steps, rng=jax.random.PRNGKey(1),
                                               top_k=100, temperature=1.0), repeats)
    moved = decode_bytes(gpt, params, b, cond.shape[1], steps)
    step_s = total / (steps - 1)  # steps - 1 forward steps; the prefix pass and the last draw are in total_s too
    record = dict(workload="gpt_sample", impl="vqgan-jax", tokens_per_s=b * steps / total, total_s=total,
                  compile_s=first, step_ms=total / steps * 1e3, repeats=repeats,
                  total_s_all=[round(t, 3) for t in times], batch=b, steps=steps, top_k=100, dtype=dtype,
                  params=sum(x.size for x in jax.tree.leaves(params)), bytes_per_step=moved,
                  gb_per_s=moved / step_s / 1e9)
    peak = device_peak(PEAK_BANDWIDTH)
    if peak:
        record.update(memory_bandwidth_fraction=moved / step_s / peak, peak_bandwidth_tb_s=peak / 1e12)
    return record


def decode_bytes(gpt, params, batch: int, n_cond: int, steps: int) -> float:
    """Bytes one decoding step of `sample` reads, averaged over the steps: every weight but the embedding
    tables (one row each is gathered), plus the keys and values of the cache segment the step attends
    over (sampler.segment_lengths: a step reads its segment's whole cache)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    weights = sum(x.nbytes for path, x in leaves if not any("emb" in str(getattr(k, "key", k)) for k in path))
    itemsize = jnp.dtype(gpt.dtype).itemsize
    kv_per_position = 2 * gpt.n_layer * batch * gpt.n_embd * itemsize
    kv, first = 0, 0
    for n in segment_lengths(n_cond, n_cond + steps - 1):
        end = min(n - n_cond, steps - 1)
        kv += (end - first) * n * kv_per_position
        first = end
    return weights + kv / (steps - 1)


def bench_window_sample(spec: dict, workloads: dict, repeats: int, dtype: str) -> dict:
    gpt, params = _gpt(spec["model"], dtype)
    b, (h, w), win = spec["batch"], spec["grid"], spec["window"]
    cond = jax.random.randint(jax.random.PRNGKey(2), (b, h, w), 0, spec["model"]["vocab_size"])
    first, total, times = _time(lambda: sample_windowed(gpt, params, cond, shape=(h, w), rng=jax.random.PRNGKey(1),
                                                        window=win, top_k=100), repeats)
    return dict(workload="window_sample", impl="vqgan-jax", tokens_per_s=b * h * w / total, total_s=total,
                compile_s=first, repeats=repeats, total_s_all=[round(t, 3) for t in times], batch=b,
                grid=[h, w], window=win, top_k=100, dtype=dtype, tokens_forwarded=window_tokens(h, w, win))


def window_tokens(h: int, w: int, win: int, prefill_chunk: int = 128) -> dict:
    """Tokens run through the transformer for one grid and forward calls: ours (condition prefixes per row
    band and window column; each position runs the codes its column's cache lacks) against the original's
    2 * win**2 - 1 tokens in one call per position."""
    from vqgan_jax.sampling.windowed import chunk_sizes, placement

    rows, cols = placement((h, w), win)
    sizes = chunk_sizes(win, prefill_chunk)
    n_bands = len(set(rows.tolist()))
    prefixes = n_bands * (int(cols.max()) + 1) * win * win
    codes = calls = 0
    lengths = {}
    for i in range(h):
        if i == 0 or rows[i] != rows[i - 1]:
            lengths = {}
        for j in range(w):
            c = int(cols[j])
            p = (i - rows[i]) * win + j - c
            missing = p - lengths.get(c, 0)
            codes += missing
            for size in sizes:
                calls += missing // size
                missing %= size
            lengths[c] = p
    original = h * w * (2 * win * win - 1)
    return {"ours": int(prefixes + codes), "ours_calls": int(calls + n_bands), "original": int(original),
            "original_calls": h * w, "ratio": float(original / (prefixes + codes))}
