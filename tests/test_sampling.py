"""Sampling: exact greedy parity with the original (plain and sliding-window), and what the filters,
seeds, guidance, completion and in-painting must guarantee."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqgan_jax as vj
from vqgan_jax.sampling import filters, sample, sample_windowed
from vqgan_jax.sampling.cache import decoder, empty_cache, forward
from vqgan_jax.sampling.step import prepare, step
from vqgan_jax.sampling.windowed import window_start
from vqgan_jax.sampling.sampler import segment_lengths


@pytest.fixture(scope="module")
def small_gpt(taming):
    return vj.convert.gpt_from_taming(taming.state("gpt"), taming.gpt_params())


@pytest.fixture(scope="module")
def window_gpt(taming):
    return vj.convert.gpt_from_taming(taming.state("window"), taming.gpt_params("window"))


def test_sample_greedy_reproduces_the_original(taming, small_gpt):
    gpt, params = small_gpt
    out = sample(gpt, params, taming["gpt/greedy_cond"], steps=taming["gpt/greedy"].shape[1],
                 rng=jax.random.PRNGKey(0), greedy=True)
    np.testing.assert_array_equal(out, taming["gpt/greedy"])


# 5 divides no window area; 1: every code its own call; 10_000: one chunk for the whole window
@pytest.mark.parametrize("prefill_chunk", [128, 5, 1, 10_000])
def test_sample_windowed_greedy_reproduces_the_original(taming, window_gpt, prefill_chunk):
    gpt, params = window_gpt
    cond = taming["window/cond"]
    out = sample_windowed(gpt, params, cond, shape=cond.shape[1:], rng=jax.random.PRNGKey(0),
                          window=taming.meta["window"]["window"], greedy=True, prefill_chunk=prefill_chunk)
    np.testing.assert_array_equal(out, taming["window/sample"])


def _windowed_reference(gpt, params, cond, shape, window):
    """The original's loop, greedy: for every position one uncached forward pass over the condition (crop
    or tokens) and the window's codes before it."""
    h, w = shape
    b = cond.shape[0]
    length = (window * window if cond.ndim == 3 else cond.shape[1]) + window * window - 1
    # Padded to one length (one compile): attention is causal, so the padding never reaches the last code.
    last_logits = jax.jit(lambda seq, at: gpt.apply({"params": params}, seq)[jnp.arange(b), at])
    grid = np.zeros((b, h, w), np.int32)
    for i in range(h):
        for j in range(w):
            r, c = window_start(i, h, window), window_start(j, w, window)
            codes = grid[:, r:r + window, c:c + window].reshape(b, -1)[:, :(i - r) * window + j - c]
            prefix = cond[:, r:r + window, c:c + window].reshape(b, -1) if cond.ndim == 3 else cond
            seq = np.concatenate([prefix, codes], axis=1)
            padded = np.pad(seq, ((0, 0), (0, length - seq.shape[1])))
            grid[:, i, j] = np.asarray(last_logits(padded, seq.shape[1] - 1)).argmax(-1)
    return grid


@pytest.mark.parametrize("kind", ["grid", "tokens"])
def test_sample_windowed_greedy_equals_the_uncached_loop_on_an_odd_window(window_gpt, kind):
    # An odd window, which the original's placement would push past the grid's end (clamped here), on a
    # grid that is not square, the condition a grid crop or a token prefix, codes run in 4-token chunks.
    gpt, params = window_gpt
    shape, window = (10, 12), 5
    rng = np.random.default_rng(0)
    cond = rng.integers(0, gpt.vocab_size, (2, *shape) if kind == "grid" else (2, 3)).astype(np.int32)
    out = sample_windowed(gpt, params, cond, shape=shape, rng=jax.random.PRNGKey(0), window=window,
                          greedy=True, prefill_chunk=4)
    np.testing.assert_array_equal(out, _windowed_reference(gpt, params, cond, shape, window))


# Weight matrices whole, or in 3 (uneven) row blocks; a GPT computing in bfloat16 (its cache too).
@pytest.mark.parametrize("parts,dtype", [(1, "float32"), (3, "float32"), (3, "bfloat16")])
def test_decoding_step_equals_the_decoding_module(small_gpt, parts, dtype):
    # The samplers' decoding step (transposed weights, feature-major activations) against the GPT module
    # in decoding mode, from a cache the module filled: same logits, same cache.
    gpt, params = small_gpt
    gpt = gpt.clone(dtype=jnp.dtype(dtype))
    # The fixture's positional embeddings are the original's initial zeros: random ones here, so that reading
    # another position's would show.
    params = dict(params, pos_emb=jax.random.normal(jax.random.PRNGKey(7), params["pos_emb"].shape))
    dec = decoder(gpt)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, gpt.vocab_size, (3, 6)), jnp.int32)
    _, cache = forward(dec, params, empty_cache(dec, 3), tokens[:, :3])
    want_logits, want_cache = forward(dec, params, cache, tokens[:, 3:])
    logits, cache = jax.jit(step, static_argnums=0)(gpt, prepare(gpt, params, parts), cache, tokens[:, 3:])
    # bfloat16: a few units of its rounding (2^-8 relative; logits of up to ~10 here), as the two round in
    # other places (e.g. the attention's products, laid out differently)
    tol = 1e-5 if dtype == "float32" else 5e-2
    assert logits.dtype == want_logits.dtype == jnp.float32  # the head computes in float32
    np.testing.assert_allclose(np.float32(logits), np.float32(want_logits), rtol=tol, atol=2 * tol)
    assert jax.tree.structure(cache) == jax.tree.structure(want_cache)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol / 10),
                 cache, want_cache)
    if dtype == "bfloat16":  # the sampler: prefix through the module, tokens through the step
        drawn = sample(gpt, params, tokens[:, :1], steps=5, rng=jax.random.PRNGKey(0), top_k=5)
        assert drawn.shape == (3, 5) and 0 <= int(drawn.min()) and int(drawn.max()) < gpt.vocab_size


def test_decoding_segments_cover_every_position_once():
    assert segment_lengths(1, 256) == [64, 128, 192, 256]
    assert segment_lengths(31, 50) == [39, 50]      # a long prefix starts at the first length that holds it
    assert segment_lengths(50, 50) == [50]
    assert segment_lengths(1, 3) == [1, 2, 3]


def test_all_codes_given_returns_them(small_gpt):
    gpt, params = small_gpt
    given = jnp.arange(12, dtype=jnp.int32).reshape(2, 6)
    out = sample(gpt, params, jnp.zeros((2, 1), jnp.int32), steps=6, rng=jax.random.PRNGKey(0), given=given)
    np.testing.assert_array_equal(out, given)


def test_window_placement_is_the_originals():
    # scripts/sample_conditional.py with a 16 window: local = k (k <= 8), 16 - (size - k) near the end, else 8.
    assert [window_start(k, 19, 16) for k in range(19)] == [0] * 9 + [1, 2, 3] + [3] * 7
    assert [window_start(k, 16, 16) for k in range(16)] == [0] * 16
    assert [window_start(k, 12, 5) for k in range(12)] == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 7]  # 8 clamped


@pytest.mark.parametrize("k", [1, 7, 100, 1023])
def test_top_k_threshold_is_the_kth_largest(k):
    logits = jax.random.normal(jax.random.PRNGKey(k), (4, 1024)) * 3
    logits = logits.at[0, :5].set(-jnp.inf).at[1, 10:40].set(logits[1, 9]).at[2].set(-jnp.abs(logits[2]))
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    np.testing.assert_array_equal(filters.top_k_filter(logits, k), jnp.where(logits < kth, -jnp.inf, logits))


def test_top_k_and_top_p_keep_what_they_must():
    logits = jnp.array([[3.0, 1.0, 2.0, 0.0, 2.0]])
    np.testing.assert_array_equal(jnp.isfinite(filters.top_k_filter(logits, 2)), [[1, 0, 1, 0, 1]])  # ties kept
    probs = jax.nn.softmax(logits)[0]  # 0.52, 0.07, 0.19, 0.03, 0.19 (rounded)
    assert 0.5 < probs[0] < 0.6
    np.testing.assert_array_equal(jnp.isfinite(filters.top_p_filter(logits, 0.6)), [[1, 0, 1, 0, 1]])
    np.testing.assert_array_equal(jnp.isfinite(filters.top_p_filter(logits, 0.5)), [[1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(jnp.isfinite(filters.top_p_filter(logits, 1.0)), [[1, 1, 1, 1, 1]])
    # A token whose more likely tokens hold exactly p is kept (transformers drops it only above p) ...
    cumulative = jnp.cumsum(jax.nn.softmax(jnp.sort(logits)[..., ::-1]), axis=-1)
    np.testing.assert_array_equal(jnp.isfinite(filters.top_p_filter(logits, cumulative[0, 0])), [[1, 0, 1, 0, 1]])
    # ... so p = 1 keeps every token, even where the float sum reaches 1 before the last one.
    wide = jax.random.normal(jax.random.PRNGKey(0), (2, 1024)) * 6
    assert bool(jnp.all(jnp.isfinite(filters.top_p_filter(wide, 1.0))))


def test_filter_logits_masks_past_num_codes_and_divides_by_the_temperature_before_top_p():
    np.testing.assert_array_equal(jnp.isfinite(filters.filter_logits(jnp.zeros((1, 10)), num_codes=7))[0],
                                  np.arange(10) < 7)
    logits = jnp.array([[3.0, 1.0, 2.0, 0.0, 1.5]])
    hot = jnp.isfinite(filters.filter_logits(logits, temperature=2.0, top_p=0.5))
    np.testing.assert_array_equal(hot, jnp.isfinite(filters.top_p_filter(logits / 2.0, 0.5)))
    assert int(hot.sum()) == 2 and int(jnp.isfinite(filters.top_p_filter(logits, 0.5)).sum()) == 1


def _teacher_forced_logits(gpt, params, cond, codes):
    sequence = jnp.concatenate([jnp.asarray(cond), codes], axis=1)[:, :-1]
    return gpt.apply({"params": params}, sequence)[:, cond.shape[1] - 1:]


@pytest.mark.parametrize("top_k, top_p", [(3, None), (None, 0.3), (8, 0.3)])
def test_only_allowed_tokens_are_drawn(small_gpt, top_k, top_p):
    gpt, params = small_gpt
    cond = jnp.array([[3], [7], [1], [2]])
    codes = sample(gpt, params, cond, steps=40, rng=jax.random.PRNGKey(5), top_k=top_k, top_p=top_p,
                   temperature=1.3)
    logits = _teacher_forced_logits(gpt, params, cond, codes)
    allowed = jnp.isfinite(filters.filter_logits(logits.reshape(-1, gpt.vocab_size), 1.3, top_k, top_p))
    assert bool(jnp.all(jnp.take_along_axis(allowed, codes.reshape(-1, 1), axis=1)))
    if top_k:  # the filter really removes something
        assert int(allowed.sum(-1).max()) <= top_k


def test_fixed_seed_gives_the_same_sample(small_gpt):
    gpt, params = small_gpt
    cond = jnp.array([[3], [7]])
    a = sample(gpt, params, cond, steps=30, rng=jax.random.PRNGKey(1), top_k=10)
    b = sample(gpt, params, cond, steps=30, rng=jax.random.PRNGKey(1), top_k=10)
    c = sample(gpt, params, cond, steps=30, rng=jax.random.PRNGKey(2), top_k=10)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_guidance_scale_one_is_no_guidance_and_other_scales_mix_the_two_branches(small_gpt):
    gpt, params = small_gpt
    cond = jnp.array([[3], [7]])
    plain = sample(gpt, params, cond, steps=20, rng=jax.random.PRNGKey(4), top_k=10)
    np.testing.assert_array_equal(sample(gpt, params, cond, steps=20, rng=jax.random.PRNGKey(4), top_k=10,
                                         cfg_scale=1.0), plain)
    scale = 3.0
    guided = sample(gpt, params, cond, steps=20, rng=jax.random.PRNGKey(4), greedy=True, cfg_scale=scale)
    null = jnp.full_like(cond, gpt.vocab_size - 1)
    c_logits = _teacher_forced_logits(gpt, params, cond, guided)
    u_logits = _teacher_forced_logits(gpt, params, null, guided)
    np.testing.assert_array_equal(guided, jnp.argmax(u_logits + scale * (c_logits - u_logits), axis=-1))


def test_completion_keeps_the_given_codes_and_continues_greedily(taming, small_gpt):
    gpt, params = small_gpt
    full = taming["gpt/greedy"]
    given = full[:, :30].copy()
    given[:, 29] = (given[:, 29] + 1) % gpt.vocab_size  # a change the continuation must follow
    out = sample(gpt, params, taming["gpt/greedy_cond"], steps=50, rng=jax.random.PRNGKey(0), greedy=True,
                 given=given)
    np.testing.assert_array_equal(out[:, :30], given)
    logits = _teacher_forced_logits(gpt, params, jnp.asarray(taming["gpt/greedy_cond"]), out)
    np.testing.assert_array_equal(out[:, 30:], jnp.argmax(logits, -1)[:, 30:])


def test_windowed_with_a_token_prefix_on_one_window_equals_plain_sampling(window_gpt):
    """... and with num_codes both draw only the first stage's codes."""
    gpt, params = window_gpt
    cond = jnp.array([[5], [9]])
    grid = sample_windowed(gpt, params, cond, shape=(16, 16), rng=jax.random.PRNGKey(0), greedy=True)
    plain = sample(gpt, params, cond, steps=256, rng=jax.random.PRNGKey(0), greedy=True)
    np.testing.assert_array_equal(grid.reshape(2, -1), plain)
    assert int(plain.max()) >= 7  # so that the restriction below has something to remove
    grid = sample_windowed(gpt, params, cond, shape=(16, 16), rng=jax.random.PRNGKey(0), num_codes=7)
    plain = sample(gpt, params, cond, steps=256, rng=jax.random.PRNGKey(0), num_codes=7)
    np.testing.assert_array_equal(grid.reshape(2, -1), plain)
    assert int(plain.max()) < 7 and len(np.unique(plain)) > 1


def test_windowed_inpainting_keeps_the_codes_outside_the_mask(taming, window_gpt):
    gpt, params = window_gpt
    cond = taming["window/cond"]
    init = taming["window/sample"]
    mask = np.zeros(init.shape, bool)
    mask[:, 5:9, 10:20] = True
    out = np.asarray(sample_windowed(gpt, params, cond, shape=cond.shape[1:], rng=jax.random.PRNGKey(3),
                                     top_k=5, init=init, mask=mask))
    np.testing.assert_array_equal(out[~mask], init[~mask])
    assert not np.array_equal(out[mask], init[mask])


def test_bad_requests_are_named(small_gpt, window_gpt):
    gpt, params = small_gpt
    with pytest.raises(ValueError, match="exceed block_size"):
        sample(gpt, params, jnp.array([[3]]), steps=gpt.block_size + 1, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="out of range"):
        sample(gpt, params, jnp.array([[gpt.vocab_size]]), steps=4, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="top_p"):
        sample(gpt, params, jnp.array([[3]]), steps=4, rng=jax.random.PRNGKey(0), top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(gpt, params, jnp.array([[3]]), steps=4, rng=jax.random.PRNGKey(0), temperature=0.0)
    with pytest.raises(ValueError, match="num_codes must be in"):
        sample(gpt, params, jnp.array([[3]]), steps=4, rng=jax.random.PRNGKey(0), num_codes=gpt.vocab_size + 1)
    for steps in (0, 2.5):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            sample(gpt, params, jnp.array([[3]]), steps=steps, rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        sample(gpt, params, jnp.array([[3]]), steps=4, rng=jax.random.PRNGKey(0), cfg_scale=float("nan"))
    with pytest.raises(TypeError, match="rng must be a PRNG key"):
        sample(gpt, params, jnp.array([[3]]), steps=4, rng=0)
    wgpt, wparams = window_gpt
    for top_k in (0, 2.5):
        with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
            sample_windowed(wgpt, wparams, jnp.array([[3]]), shape=(16, 16), rng=jax.random.PRNGKey(0), top_k=top_k)
    codes = jnp.zeros((1, 16, 16), jnp.int32)
    with pytest.raises(ValueError, match="init and mask go together"):
        sample_windowed(wgpt, wparams, jnp.array([[3]]), shape=(16, 16), rng=jax.random.PRNGKey(0), init=codes)
    with pytest.raises(ValueError, match="mask must be bool"):
        sample_windowed(wgpt, wparams, jnp.array([[3]]), shape=(16, 16), rng=jax.random.PRNGKey(0), init=codes,
                        mask=jnp.full((1, 16, 16), 0.5))
    with pytest.raises(ValueError, match=r"shape must be the grid's \(H, W\)"):
        sample_windowed(wgpt, wparams, jnp.array([[3]]), shape=(16, 16, 1), rng=jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="rng must be a PRNG key"):
        sample_windowed(wgpt, wparams, jnp.array([[3]]), shape=(16, 16), rng=None)
    for shape in ((8, 20), (20, 8)):
        with pytest.raises(ValueError, match="smaller than the window"):
            sample_windowed(wgpt, wparams, jnp.array([[3]]), shape=shape, rng=jax.random.PRNGKey(0))
    # block_size=80 holds 17 condition tokens and an 8x8 window's first 63 codes, not 18.
    with pytest.raises(ValueError, match="18 condition tokens .* exceed block_size=80"):
        sample_windowed(gpt, params, jnp.full((1, 18), 3), shape=(8, 8), rng=jax.random.PRNGKey(0), window=8)
    exact = sample_windowed(gpt, params, jnp.full((1, 17), 3), shape=(8, 8), rng=jax.random.PRNGKey(0), window=8,
                            greedy=True)
    np.testing.assert_array_equal(exact, sample(gpt, params, jnp.full((1, 17), 3), steps=64,
                                                rng=jax.random.PRNGKey(0), greedy=True).reshape(1, 8, 8))
    with pytest.raises(ValueError, match="must have the sampled shape"):
        sample_windowed(wgpt, wparams, jnp.zeros((1, 16, 17), jnp.int32), shape=(16, 16), rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="prefill_chunk >= 1"):
        sample_windowed(wgpt, wparams, jnp.array([[3]]), shape=(16, 16), rng=jax.random.PRNGKey(0), prefill_chunk=0)


def test_generate_refuses_what_the_model_cannot_sample(small_gpt):
    """Grids below the window, given codes that are no prefix, guidance without cond_drop, unknown classes."""
    from vqgan_jax.models import VQGAN
    from vqgan_jax.sampling.generate import Net2Net, _given_prefix, condition, generate

    vq = VQGAN(ch=8, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), resolution=16, n_embed=16)
    model = Net2Net(*small_gpt, vq, None, "sos", {}, train_size=16)  # window 8
    with pytest.raises(ValueError, match=r"grid \(4, 8\) is smaller than the training window 8x8"):
        generate(model, jnp.zeros((1, 1), jnp.int32), (4, 8), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="guidance needs a model trained with cond_drop > 0"):
        generate(model, jnp.zeros((1, 1), jnp.int32), (8, 8), jax.random.PRNGKey(0), cfg_scale=2.0)
    classes = Net2Net(*small_gpt, vq, None, "class", {"n_classes": 10}, train_size=16)
    with pytest.raises(ValueError, match=r"classes \[3, 12\] outside the model's 0..9"):
        condition(classes, 2, (8, 8), classes=np.array([3, 12]))
    np.testing.assert_array_equal(_given_prefix(np.array([[1, 2, -1, -1], [3, 4, -1, -1]])), [[1, 2], [3, 4]])
    for flat in ([[1, 2, 3, 4], [1, 2, -1, -1]], [[1, -1, 2, -1]], [[1, -1, -1], [1, 2, -1]]):
        with pytest.raises(ValueError, match="raster-order prefix"):
            _given_prefix(np.array(flat))


def test_sample_cli_writes_a_wider_image_than_the_training_crop(tmp_path):
    """sample.py on a saved run: a 16x48 image from a model trained on 16x16 crops (windowed sampling)."""
    import json
    import os
    import subprocess
    import sys

    from PIL import Image

    from vqgan_jax.models import GPT, VQGAN
    from vqgan_jax.pretrained import save_pretrained

    vq = VQGAN(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(), resolution=16, z_channels=4,
               embed_dim=4, n_embed=20)
    gpt = GPT(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16)
    export = tmp_path / "run" / "export"
    save_pretrained(str(export / "vqgan"), vq, vq.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
    save_pretrained(str(export / "gpt"), gpt, gpt.init(jax.random.PRNGKey(1), jnp.zeros((1, 2), jnp.int32)))
    (export / "net2net.json").write_text(json.dumps({
        "first_stage": {"checkpoint": str(export / "vqgan"), "config": ""}, "data_size": 16,
        "cond_stage": {"kind": "sos", "checkpoint": "", "config": "", "sos_token": 0, "n_embed": 20,
                       "down_factor": 4, "n_classes": 0}}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "sample.py", "--workdir", str(tmp_path / "run"), "--n", "2",
                             "--size", "16x48", "--top_k", "5", "--out", str(tmp_path / "out")],
                            cwd=root, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONPATH=root))
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "out" / "sample_0001.png").size == (48, 16)
    assert Image.open(tmp_path / "out" / "grid.png").size == (96, 16)
    # A flag the model's condition has no use for is refused, not ignored.
    result = subprocess.run([sys.executable, "sample.py", "--workdir", str(tmp_path / "run"), "--classes", "1"],
                            cwd=root, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=root))
    assert result.returncode != 0 and "--classes is for class-conditional models; this one is sos" in result.stderr
    result = subprocess.run([sys.executable, "sample.py", "--workdir", str(tmp_path / "run"), "--train_size", "32"],
                            cwd=root, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=root))
    assert result.returncode != 0 and "--train_size describe a model given by parts" in result.stderr
    result = subprocess.run([sys.executable, "sample.py", "--workdir", str(tmp_path / "run"), "--n", "0"],
                            cwd=root, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=root))
    assert result.returncode != 0 and "flag --n=0: 0 is not a positive integer" in result.stderr
