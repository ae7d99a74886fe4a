"""Codebook options: each one's maths on small arrays, the EMA step inside the training step, and the same
restarts on every device."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vqgan_jax import losses
from vqgan_jax.models import VectorQuantizer
from vqgan_jax.models.quantizer import entropy_penalty
from vqgan_jax.train import codebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


def _quantizer(**options):
    q = VectorQuantizer(n_embed=16, embed_dim=6, **options)
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 6))
    return q, z, q.init(jax.random.PRNGKey(1), z)


# --- quantiser options -----------------------------------------------------------------------------

def test_l2_search_is_cosine_nearest():
    q, z, variables = _quantizer(l2_normalize=True)
    # Codes of very different lengths: a plain distance search would prefer the short ones.
    scale = jnp.linspace(0.01, 10.0, 16)[:, None]
    variables = {"params": {"embedding": {"embedding": jax.random.normal(jax.random.PRNGKey(2), (16, 6)) * scale}}}
    out = q.apply(variables, z)
    e = np.asarray(variables["params"]["embedding"]["embedding"])
    flat = np.asarray(z).reshape(-1, 6)
    cosine = (flat / np.linalg.norm(flat, axis=1, keepdims=True)) @ (e / np.linalg.norm(e, axis=1, keepdims=True)).T
    np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), cosine.argmax(1))
    unit = e[np.asarray(out.indices)] / np.linalg.norm(e[np.asarray(out.indices)], axis=-1, keepdims=True)
    np.testing.assert_allclose(out.z_q, unit, atol=1e-6)  # the decoder gets the unit code
    np.testing.assert_allclose(np.linalg.norm(out.latents, axis=-1), 1.0, atol=1e-6)


def test_l2_straight_through_passes_the_normalisation():
    q, z, variables = _quantizer(l2_normalize=True)
    g = jax.random.normal(jax.random.PRNGKey(3), z.shape)  # an upstream gradient on z_q
    g_z = jax.grad(lambda z: jnp.sum(q.apply(variables, z).z_q * g))(z)
    # As LlamaGen's z_q = z + (z_q - z).detach() with z already unit: the gradient of the normalisation,
    # which has no component along z (a plain pass-around would return g itself).
    expected = jax.grad(lambda z: jnp.sum(z / jnp.linalg.norm(z, axis=-1, keepdims=True) * g))(z)
    np.testing.assert_allclose(g_z, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(g_z * z, axis=-1), 0.0, atol=1e-5)


def test_factorised_codes_shapes_and_gradients():
    q, z, variables = _quantizer(codebook_dim=3, l2_normalize=True, legacy=False)
    p = variables["params"]
    assert p["embedding"]["embedding"].shape == (16, 3)
    assert p["in_proj"]["kernel"].shape == (6, 3) and p["out_proj"]["kernel"].shape == (3, 6)
    out = q.apply(variables, z)
    assert out.z_q.shape == z.shape and out.latents.shape == (2, 3, 4, 3)
    np.testing.assert_allclose(out.z_q, q.apply(variables, out.indices, method=q.lookup), atol=1e-6)

    def decoder_side(params, z):  # what the decoder's loss sees: a function of z_q only
        return jnp.sum(q.apply({"params": params}, z).z_q ** 2)

    g_params, g_z = jax.grad(decoder_side, argnums=(0, 1))(p, z)
    # Straight through: the decoder's gradient reaches the encoder through out_proj and in_proj, and the
    # codebook gets none of it.
    assert float(jnp.abs(g_z).max()) > 0
    assert float(jnp.abs(g_params["in_proj"]["kernel"]).max()) > 0
    assert float(jnp.abs(g_params["out_proj"]["kernel"]).max()) > 0
    assert float(jnp.abs(g_params["embedding"]["embedding"]).max()) == 0
    g_loss = jax.grad(lambda params: q.apply({"params": params}, z).loss)(p)
    assert float(jnp.abs(g_loss["embedding"]["embedding"]).max()) > 0  # codes learn from the codebook term


def test_entropy_penalty_extremes():
    k = 8
    # Every position unsure over all codes: per-position entropy log K = batch entropy log K.
    assert abs(float(entropy_penalty(jnp.zeros((5, k)), 1.0))) < 1e-6
    # Each position sure of its own code: per-position 0, batch entropy log N.
    confident = 100.0 * jnp.eye(k)[:4]
    np.testing.assert_allclose(entropy_penalty(confident, 1.0), -np.log(4), atol=1e-4)
    # All sure of the same code: 0 - 0.
    np.testing.assert_allclose(entropy_penalty(100.0 * jnp.eye(k)[jnp.array([2, 2, 2])], 1.0), 0.0, atol=1e-4)


def test_entropy_weight_adds_the_penalty():
    q0, z, variables = _quantizer()
    q1 = VectorQuantizer(n_embed=16, embed_dim=6, entropy_weight=0.5, entropy_temperature=0.1)
    flat = np.asarray(z).reshape(-1, 6)
    e = np.asarray(variables["params"]["embedding"]["embedding"])
    dist = (flat ** 2).sum(1)[:, None] + (e ** 2).sum(1) - 2 * flat @ e.T
    expected = float(q0.apply(variables, z).loss) + 0.5 * float(entropy_penalty(-jnp.asarray(dist), 0.1))
    np.testing.assert_allclose(q1.apply(variables, z).loss, expected, rtol=1e-5)


# --- EMA, restarts, usage --------------------------------------------------------------------------

def test_assignment_stats():
    latents = jnp.arange(12.0).reshape(1, 2, 3, 2)  # six 2-d latents
    indices = jnp.array([[[0, 2, 0], [2, 2, 3]]])
    counts, sums = codebook.assignment_stats(latents, indices, 4)
    np.testing.assert_array_equal(counts, [2, 0, 3, 1])
    np.testing.assert_array_equal(sums, [[0 + 4, 1 + 5], [0, 0], [2 + 6 + 8, 3 + 7 + 9], [10, 11]])


def test_ema_update_known_values():
    cluster, embed_sum = jnp.array([1.0, 1.0, 2.0]), jnp.array([[1.0], [2.0], [3.0]])
    counts, sums = jnp.array([3.0, 0.0, 1.0]), jnp.array([[6.0], [0.0], [5.0]])
    decay, eps = 0.5, 0.1
    c, s, book = codebook.ema_update(cluster, embed_sum, counts, sums, decay, eps)
    np.testing.assert_allclose(c, [2.0, 0.5, 1.5])
    np.testing.assert_allclose(s, [[3.5], [1.0], [4.0]])
    total = 4.0
    smoothed = (np.array([2.0, 0.5, 1.5]) + eps) / (total + 3 * eps) * total
    np.testing.assert_allclose(book[:, 0], np.array([3.5, 1.0, 4.0]) / smoothed, rtol=1e-6)


def _cfg(**kw):
    import ml_collections

    base = dict(ema=False, ema_decay=0.99, ema_eps=1e-5, restart_dead=0, usage_window=50)
    return ml_collections.ConfigDict({**base, **kw})


# At step 10 with patience 3: codes 1 (last used 7), 4 (never used, never restarted) are dead; code 3 was
# restarted at step 8 and code 0 used at 9, so they are not; code 5 is used by this batch.
_DEAD_AT_10 = np.array([False, True, False, False, True, False])


def _restart_at_10(**cfg):
    """-> (old codebook, latents, rng, new codebook, new state, metrics) of `update` at step 10, patience 3."""
    k, d = 6, 2
    book = jnp.arange(k * d, dtype=jnp.float32).reshape(k, d)
    params = {"quantize": {"embedding": {"embedding": book}}}
    state = codebook.CodebookState(last_used=jnp.array([9, 7, 9, 2, -1, 1]),
                                   last_restart=jnp.array([-1, -1, -1, 8, -1, -1]),
                                   cluster_size=jnp.full((k,), 4.0), embed_sum=4.0 * book)
    latents = 100.0 + jnp.arange(8.0 * d).reshape(1, 2, 4, d)
    indices = jnp.array([[[0, 0, 2, 5], [5, 2, 0, 0]]])
    rng = jax.random.PRNGKey(3)
    new_params, new_state, metrics = codebook.update(_cfg(restart_dead=3, **cfg), params, state, latents, indices,
                                                     10, rng)
    return book, latents, rng, np.asarray(new_params["quantize"]["embedding"]["embedding"]), new_state, metrics


def test_restart_replaces_exactly_the_dead_codes():
    book, latents, rng, new_book, new_state, metrics = _restart_at_10()
    k, d = book.shape
    dead = _DEAD_AT_10
    np.testing.assert_array_equal(new_book[~dead], np.asarray(book)[~dead])
    candidates = np.asarray(codebook.restart_candidates(latents, k, rng))
    np.testing.assert_array_equal(new_book[dead], candidates[dead])
    assert all(any(np.array_equal(row, l) for l in np.asarray(latents).reshape(-1, d)) for row in new_book[dead])
    assert len({tuple(r) for r in new_book[dead]}) == 2  # drawn without replacement
    np.testing.assert_array_equal(new_state.last_restart, [-1, 10, -1, 8, 10, -1])
    np.testing.assert_array_equal(new_state.last_used, [10, 7, 10, 2, -1, 10])
    assert int(metrics["codes_restarted"]) == 2
    # Selected within the default 50-step window: 0, 2, 5 now, 1 at step 7, 3 at step 2; 4 never.
    assert int(metrics["codes_used_window"]) == 5 and int(metrics["dead_codes"]) == 1


def test_a_restarted_code_starts_its_ema_over_as_one_observation_of_its_new_value():
    _, _, _, new_book, new_state, _ = _restart_at_10(ema=True, ema_decay=0.5)
    np.testing.assert_array_equal(new_state.cluster_size[_DEAD_AT_10], 1.0)
    np.testing.assert_array_equal(new_state.embed_sum[_DEAD_AT_10], new_book[_DEAD_AT_10])
    assert not np.any(new_state.cluster_size[~_DEAD_AT_10] == 1.0)  # the others went on with their EMA


def test_codes_used_window():
    state = codebook.CodebookState(jnp.array([-1, 0, 5, 7, 9]), jnp.full((5,), -1), None, None)
    # A window of w steps at step 9 is steps 10 - w .. 9: a code last used at 7 is in it from w = 3 on.
    assert [int(codebook.codes_used(state, 9, w)) for w in (1, 2, 3, 4, 5, 10)] == [1, 1, 2, 2, 3, 4]


def test_check_config_refuses_bad_values():
    from vqgan_jax.train.config import default_config

    for section, field, value, message in [("codebook", "ema_decay", 1.0, "ema_decay"),
                                           ("codebook", "usage_window", 0, "usage_window"),
                                           ("model", "codebook_dim", -1, "codebook_dim")]:
        c = default_config()
        c[section][field] = value
        with pytest.raises(ValueError, match=message):
            codebook.check_config(c)


def test_lecam_regularizer_known_values():
    real, fake = jnp.array([1.0, -1.0, 3.0]), jnp.array([0.0, -2.0])
    # relu(real - 0.5)^2 = [0.25, 0, 6.25] -> mean 13/6; relu(0.2 - fake)^2 = [0.04, 4.84] -> mean 2.44
    np.testing.assert_allclose(losses.lecam_regularizer(real, fake, 0.2, 0.5), 6.5 / 3 + 2.44, rtol=1e-6)
    g = jax.grad(lambda r: losses.lecam_regularizer(r, fake, 0.2, 0.5))(real)
    np.testing.assert_allclose(g, [2 * 0.5 / 3, 0.0, 2 * 2.5 / 3], rtol=1e-6)


# --- inside the training step ----------------------------------------------------------------------

@pytest.mark.slow  # 1.5-2.5 min on 2 CPU cores with a cold compile cache: CI's slow step
def test_train_step_ema_codebook_and_fixed_gan_weight():
    """The codebook after a step is exactly the EMA of the step's own assignments (the optimiser leaves it
    alone); with adaptive_weight off the GAN weight is disc_weight; LeCAM's EMAs move."""
    from sharded_step_worker import codebook_config

    from vqgan_jax.models import load_lpips_params
    from vqgan_jax.train.sharding import make_mesh
    from vqgan_jax.train.state import build_models, create_state
    from vqgan_jax.train.steps import jit_train_step, phase

    c = codebook_config()
    c.codebook.restart_dead = 0
    c.loss.adaptive_weight = False
    mesh = make_mesh(c.mesh)
    models = build_models(c)
    state, shardings = create_state(models, c, mesh, jax.random.PRNGKey(0))
    state = state.replace(step=state.step + 5)  # a step the discriminator's Adam has not counted
    x = jax.random.uniform(jax.random.PRNGKey(1), (c.batch_size, 16, 16, 3), minval=-1, maxval=1)
    before = jax.device_get(state)
    q = models.vq.apply({"params": before.gen_params}, x, train=True)[1]
    step = jit_train_step(models, c, mesh, shardings, *phase(0, c.loss))
    after, metrics = step(state, {"image": x}, load_lpips_params())
    counts, sums = codebook.assignment_stats(q.latents, q.indices, c.model.n_embed)
    _, _, expected = codebook.ema_update(before.codebook.cluster_size, before.codebook.embed_sum, counts, sums,
                                         c.codebook.ema_decay, c.codebook.ema_eps)
    np.testing.assert_allclose(codebook.get_codebook(after.gen_params), expected, rtol=1e-5, atol=1e-6)
    # Every other parameter moved under Adam.
    kernel = lambda state: state.gen_params["quantize"]["in_proj"]["kernel"]  # noqa: E731
    assert not np.allclose(kernel(after), kernel(before))
    assert float(metrics["d_weight"]) == pytest.approx(c.loss.disc_weight)
    assert np.all(np.asarray(after.lecam) != 0)
    assert int(metrics["codes_used_window"]) == int(np.count_nonzero(counts))
    # The discriminator's optimiser counts from the global step, as the original's (see steps.py).
    counters = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(after.disc_opt_state)[0]
                if getattr(p[-1], "name", None) == "count"]
    assert counters and set(counters) == {6}


@pytest.mark.slow  # 1.5-2.5 min on 2 CPU cores with a cold compile cache: CI's slow step
def test_restarts_and_ema_agree_across_devices(tmp_path):
    """One step with every option on and restart_dead=1 (every code the batch leaves unused restarts):
    4 devices restart the same codes with the same latents as 1 device, and all 4 hold one codebook."""
    from test_train import WORKER, _finish, _run_python

    procs = {n: _run_python([WORKER, str(tmp_path / f"{n}.npz"), "codebook"], devices=n) for n in (1, 4)}
    for proc in procs.values():
        _finish(proc)
    one, four = np.load(tmp_path / "1.npz"), np.load(tmp_path / "4.npz")
    assert int(four["devices"]) == 4 and bool(four["codebook_copies_identical"])
    restarted = one["codebook/last_restart"] == 0
    assert 0 < restarted.sum() < restarted.size and int(one["metric/codes_restarted"]) == restarted.sum()
    np.testing.assert_array_equal(four["codebook/last_restart"], one["codebook/last_restart"])
    np.testing.assert_array_equal(four["codebook/last_used"], one["codebook/last_used"])
    for key in ("gen_params/quantize/embedding/embedding", "codebook/cluster_size", "codebook/embed_sum", "lecam"):
        np.testing.assert_allclose(four[key], one[key], rtol=1e-5, atol=1e-5, err_msg=key)  # latents: O(1)


def test_taming_export_refuses_codebook_options():
    import vqgan_jax as vj
    from vqgan_jax.models import VQGAN

    q, z, variables = _quantizer(codebook_dim=3)
    with pytest.raises(ValueError, match="codebook_dim"):
        vj.convert.vqgan_to_taming({"quantize": variables["params"]}, VQGAN())
    with pytest.raises(ValueError, match="l2_normalize"):
        vj.convert.vqgan_to_taming({"quantize": {}}, VQGAN(l2_normalize=True))
    with pytest.raises(TypeError, match="model"):  # without the model, l2-normalised codes would pass unseen
        vj.convert.vqgan_to_taming({"quantize": {}})
