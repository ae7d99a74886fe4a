"""Runs one full VQGAN training step (discriminator active) on all local devices (data x fsdp, fsdp 2 on an
even count) and saves the losses and updated parameters: `python sharded_step_worker.py OUT.npz [codebook]`.
Run by tests/test_train.py and tests/test_codebook.py in subprocesses with different device counts
(XLA_FLAGS=--xla_force_host_platform_device_count=N). With `codebook`, every codebook option is on and
every code the batch leaves unused is restarted."""

import sys

import jax
import numpy as np


def tiny_config(lpips: bool = True):
    """`lpips=False`: perceptual_weight 0, so the step leaves the LPIPS network out (a third of its compile
    time) where the test is about something else."""
    from vqgan_jax.train.config import default_config, runlocal

    c = runlocal(default_config())
    c.batch_size = 4
    c.data.size = 16
    c.model.update(ch=32, ch_mult=(1, 2), attn_resolutions=(8,), resolution=16, z_channels=8, embed_dim=8, n_embed=32)
    c.loss.update(disc_start=0, disc_ndf=8, disc_num_layers=2)
    c.optim.ema_decay = 0.9
    c.loss.perceptual_weight = 1.0 if lpips else 0.0
    return c


def codebook_config():
    c = tiny_config(lpips=False)
    c.model.update(l2_normalize=True, codebook_dim=4, legacy=False, entropy_weight=0.1)
    c.codebook.update(ema=True, restart_dead=1)
    c.loss.lecam_weight = 0.1
    return c


def main(out_path, variant=""):
    from vqgan_jax.models import load_lpips_params
    from vqgan_jax.train.sharding import batch_sharding, make_mesh, replicated
    from vqgan_jax.train.state import build_models, create_state
    from vqgan_jax.train.steps import jit_train_step, phase

    config = codebook_config() if variant == "codebook" else tiny_config()
    # On an even number of devices the kernels and the codebook (default rules) split over 2 of them too.
    config.mesh = (("data", -1), ("fsdp", 2 if jax.device_count() % 2 == 0 else 1))
    mesh = make_mesh(config.mesh)
    models = build_models(config)
    state, shardings = create_state(models, config, mesh, jax.random.PRNGKey(0))
    images = jax.random.uniform(jax.random.PRNGKey(1), (config.batch_size, 16, 16, 3), minval=-1, maxval=1)
    batch = {"image": jax.device_put(images, batch_sharding(mesh))}
    lpips_params = jax.device_put(load_lpips_params(), replicated(mesh))
    step = jit_train_step(models, config, mesh, shardings, *phase(0, config.loss))
    state, metrics = step(state, batch, lpips_params)
    flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]}
    flat.update({f"metric/{k}": np.asarray(v) for k, v in jax.device_get(metrics).items()})
    flat["devices"] = np.asarray(jax.device_count())
    copies = {}  # the codebook's pieces (fsdp) -> their copies (data)
    for shard in state.gen_params["quantize"]["embedding"]["embedding"].addressable_shards:
        copies.setdefault(str(shard.index), []).append(np.asarray(shard.data))
    flat["codebook_copies_identical"] = np.asarray(all(np.array_equal(c, same[0]) for same in copies.values()
                                                       for c in same))
    np.savez(out_path, **flat)


if __name__ == "__main__":
    main(*sys.argv[1:])
