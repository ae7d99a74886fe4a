"""Runs one transformer training step on all local devices, with the GPT's kernels and embeddings (and their
Adam moments) split over an fsdp axis of every device and the batch in 2 accumulated micro-batches, and
saves the loss, the updated state and the step's FLOPs per device: `python gpt_step_worker.py OUT.npz`.
Run by tests/test_transformer.py with 1 and 4 devices."""

import sys

import jax
import numpy as np


def tiny_config():
    from vqgan_jax.train.gpt_config import default_config

    c = default_config()
    c.batch_size = 8
    c.model.update(vocab_size=64, block_size=40, n_layer=2, n_head=2, n_embd=32)
    c.optim.base_learning_rate = 1e-4
    c.optim.grad_accum = 2
    c.mesh = [("data", 1), ("fsdp", -1)]
    c.sharding_rules = [(".*kernel", "fsdp"), (".*embedding", "fsdp")]
    return c


def tiny_batch(config, seed=1):
    """Codes [B, 4, 8] and a condition of 8 tokens: 8 + 32 - 1 = 39 positions <= block_size."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    v = config.model.vocab_size
    return {"codes": np.asarray(jax.random.randint(k1, (config.batch_size, 4, 8), 0, v)),
            "cond": np.asarray(jax.random.randint(k2, (config.batch_size, 8), 0, v))}


def main(out_path):
    from vqgan_jax.data import to_global
    from vqgan_jax.train.sharding import batch_sharding, make_mesh
    from vqgan_jax.train.transformer import build_gpt, create_state, jit_train_step, optimizer

    config = tiny_config()
    mesh = make_mesh(config.mesh)
    gpt, tx = build_gpt(config), optimizer(config)
    state, shardings = create_state(gpt, tx, config, mesh, jax.random.PRNGKey(0))
    kernel = state.params["blocks_0"]["mlp_0"]["kernel"]
    split = {str(s.index) for s in kernel.addressable_shards}
    batch = to_global(tiny_batch(config), batch_sharding(mesh))
    step = jit_train_step(gpt, tx, config, mesh, shardings).lower(state, batch, None).compile()
    cost = step.cost_analysis()
    flops = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    state, metrics = step(state, batch, None)
    flat = {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]}
    flat.update({f"metric/{k}": np.asarray(v) for k, v in jax.device_get(metrics).items()})
    flat["devices"] = np.asarray(jax.device_count())
    flat["kernel_pieces"] = np.asarray(len(split))
    flat["flops_per_device"] = np.asarray(flops)
    np.savez(out_path, **flat)


if __name__ == "__main__":
    main(sys.argv[1])
