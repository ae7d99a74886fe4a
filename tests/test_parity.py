"""Parity with the original PyTorch implementation, on its own weights and outputs (tests/fixtures)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqgan_jax as vj


@pytest.fixture(scope="module")
def vq(taming):
    return vj.convert.vqgan_from_taming(taming.state("vq"), taming.vq_params())


@pytest.fixture(scope="module")
def encoded(taming, vq):
    model, params = vq
    return model.apply({"params": params}, jnp.asarray(taming.nhwc("vq/x")), method=model.encode)


def test_encoder_latents(taming, vq):
    model, params = vq
    h = model.apply({"params": params}, jnp.asarray(taming.nhwc("vq/x")),
                    method=lambda m, x: m.quant_conv(m.encoder(x)))
    np.testing.assert_allclose(h, taming.nhwc("vq/h"), atol=1e-4)


def test_code_indices_equal(taming, encoded):
    _, indices, _ = encoded
    assert indices.dtype == jnp.int32 and indices.shape == taming["vq/indices"].shape
    np.testing.assert_array_equal(indices, taming["vq/indices"])


def test_quantised_latents_and_loss(taming, encoded):
    z_q, _, loss = encoded
    np.testing.assert_allclose(z_q, taming.nhwc("vq/z_q"), atol=1e-4)
    np.testing.assert_allclose(loss, taming["vq/qloss"], atol=1e-4)


def test_reconstruction_from_latents_and_from_indices(taming, vq, encoded):
    model, params = vq
    z_q, indices, _ = encoded
    expected = taming.nhwc("vq/x_rec")
    from_latents = model.apply({"params": params}, z_q, method=model.decode)
    from_codes = model.apply({"params": params}, indices, method=model.decode_indices)
    np.testing.assert_allclose(from_latents, expected, atol=1e-3)
    np.testing.assert_allclose(from_codes, expected, atol=1e-3)


def test_full_forward_matches(taming, vq):
    model, params = vq
    x_rec, q = jax.jit(model.apply)({"params": params}, jnp.asarray(taming.nhwc("vq/x")))
    np.testing.assert_allclose(x_rec, taming.nhwc("vq/x_rec"), atol=1e-3)
    used = np.unique(taming["vq/indices"]).size
    np.testing.assert_allclose(q.usage, used / taming.meta["vq"]["n_embed"], rtol=1e-6)
    assert 1.0 <= float(q.perplexity) <= used


def test_discriminator_logits_in_training_mode(taming):
    disc, variables = vj.convert.discriminator_from_taming(taming.state("disc"), **taming.meta["disc"])
    logits, updates = disc.apply(variables, jnp.asarray(taming.nhwc("disc/x")), train=True,
                                 mutable=["batch_stats"])
    np.testing.assert_allclose(logits, taming.nhwc("disc/logits_train"), atol=1e-3)
    assert set(updates) == {"batch_stats"}


def test_gpt_logits(taming):
    gpt, params = vj.convert.gpt_from_taming(taming.state("gpt"), taming.gpt_params())
    logits = gpt.apply({"params": params}, jnp.asarray(taming["gpt/idx"], jnp.int32))
    expected = taming["gpt/logits"]
    assert np.max(np.abs(logits - expected)) <= 1e-4 * np.max(np.abs(expected))


def test_gpt_greedy_decoding_with_kv_cache(taming):
    """One token at a time through the cache reproduces the original's greedy decoding."""
    config = taming.gpt_params()
    _, params = vj.convert.gpt_from_taming(taming.state("gpt"), config)
    gpt = vj.GPT(**config, decode=True)
    cond = jnp.asarray(taming["gpt/greedy_cond"], jnp.int32)
    steps = taming["gpt/greedy"].shape[1]
    cache = gpt.init(jax.random.PRNGKey(0), jnp.zeros((cond.shape[0], config["block_size"]), jnp.int32))["cache"]

    @jax.jit
    def step(cache, tokens):
        logits, updated = gpt.apply({"params": params, "cache": cache}, tokens, mutable=["cache"])
        return updated["cache"], jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]

    tokens, out = cond, []
    for _ in range(steps):
        cache, tokens = step(cache, tokens)
        out.append(tokens)
    np.testing.assert_array_equal(jnp.concatenate(out, axis=1), taming["gpt/greedy"])


@pytest.mark.parametrize("part", ["vq", "disc", "gpt"])
def test_round_trip_to_taming(taming, part):
    state = taming.state(part)
    if part == "vq":
        vq, params = vj.convert.vqgan_from_taming(state, taming.vq_params())
        back = vj.convert.vqgan_to_taming(params, vq)
    elif part == "disc":
        _, variables = vj.convert.discriminator_from_taming(state, **taming.meta["disc"])
        back = vj.convert.discriminator_to_taming(variables)
    else:
        _, params = vj.convert.gpt_from_taming(state, taming.gpt_params())
        back = vj.convert.gpt_to_taming(params)
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        assert back[key].shape == value.shape and back[key].dtype == value.dtype, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
