"""`run(config, workdir)`: the transformer training loop; `evaluate(config, workdir)`: validation NLL.

Input is a code cache (`data.codes`) or images encoded inside the step by the frozen stages. The run's
opening and step loop are `runner`'s, as for the VQGAN; this module adds the stages, validation, sample
grids and the GPT's export.
"""

import functools
import json
import os

import jax
import numpy as np

from vqgan_jax import data
from vqgan_jax.data.codes import code_batches, code_eval_batches
from vqgan_jax.pretrained import save_pretrained
from vqgan_jax.train import runner
from vqgan_jax.train.sharding import batch_sharding, replicated
from vqgan_jax.train.stages import (STAGES, check_code_cache, check_config, fingerprint, load_stages, load_vqgan,
                                    stage_fingerprints)
from vqgan_jax.train.transformer import (build_gpt, create_state, jit_train_step, make_eval_step, optimizer,
                                         state_shapes)
from vqgan_jax.train.workdir import check_stages, write_eval, write_stages


def _stages(config):
    """-> ((stage_models, stage_params), fingerprints). Stages: loaded when training reads images, (None,
    None) with a code cache (whose vocabulary is checked against the GPT's instead). fingerprints:
    `stages.stage_fingerprints` of the loaded weights, or the ones the cache's meta data records (None
    where a stage is absent, or an older cache has none)."""
    if not config.data.codes:
        models, params = load_stages(config)
        return (models, params), stage_fingerprints(params)
    from vqgan_jax.data.codes import CodeCache

    metas = {field: CodeCache(config.data[field]).meta for field in ("codes", "eval_codes") if config.data[field]}
    for field, meta in metas.items():
        check_code_cache(config, meta, field)
    fingerprints = {stage: metas["codes"].get(f"{stage}_fingerprint") for stage in STAGES}
    if "eval_codes" in metas:
        if any(metas["codes"][k] != metas["eval_codes"][k] for k in ("code_shape", "cond_length")):
            raise ValueError(f"data.codes and data.eval_codes hold sequences of different shapes: code grids "
                             f"{metas['codes']['code_shape']} and {metas['eval_codes']['code_shape']}, conditions "
                             f"of {metas['codes']['cond_length']} and {metas['eval_codes']['cond_length']} tokens")
        for stage, a in fingerprints.items():
            b = metas["eval_codes"].get(f"{stage}_fingerprint")
            if a and b and a != b:
                raise ValueError(f"data.codes and data.eval_codes were encoded by different {stage} weights "
                                 f"(fingerprints {a} and {b}): their codes do not mean the same images")
    return (None, None), fingerprints


def _open(config, workdir, allow_config_changes: bool | None = None):
    """-> (mesh, gpt, tx, shardings, checkpointer, state, stages, fingerprints): `runner.open_run` for the
    GPT, after the frozen stages (`_stages`; their params come back replicated over the mesh) are loaded
    and checked against the ones the run recorded: refused on resume (unless `allow_config_changes`),
    noted when evaluating (None)."""
    check_config(config)
    runner.initialize_distributed(config)  # before the stages' weights start a JAX backend
    gpt, tx = build_gpt(config), optimizer(config)
    (stage_models, stage_params), fingerprints = _stages(config)
    check_stages(fingerprints, workdir, allow_config_changes is not False)
    mesh, checkpointer, state, shardings = runner.open_run(
        config, workdir, functools.partial(state_shapes, gpt, tx, config),
        functools.partial(create_state, gpt, tx, config), allow_config_changes)
    stages = (stage_models, jax.device_put(stage_params, replicated(mesh)))
    return mesh, gpt, tx, shardings, checkpointer, state, stages, fingerprints


def _train_batches(config, start):
    if config.data.codes:
        return code_batches(config.data.codes, config.batch_size, config.seed, start)
    return data.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                               start_step=start)


def _eval_batches(config):
    """Validation batches, or None where no validation data is configured."""
    if config.data.codes:
        return code_eval_batches(config.data.eval_codes, config.batch_size) if config.data.eval_codes else None
    return data.eval_iterator(config.data, batch_size=config.batch_size)


def validation_nll(config, gpt, params, stages, mesh) -> dict | None:
    """Mean negative log-likelihood of the validation codes: nats and bits per token. stages:
    (stage_models, stage_params) as `_open` returns them."""
    batches = _eval_batches(config)
    if batches is None:
        return None
    stage_models, stage_params = stages
    step = jax.jit(make_eval_step(gpt, config, stage_models),
                   in_shardings=(None, batch_sharding(mesh), replicated(mesh)), out_shardings=replicated(mesh))
    total, tokens = 0.0, 0
    for i, batch in enumerate(batches):
        if config.eval_batches and i >= config.eval_batches:
            break
        nll, count = jax.device_get(step(params, data.to_global(batch, batch_sharding(mesh)), stage_params))
        total, tokens = total + float(nll), tokens + int(count)
    if tokens == 0:
        return None
    return {"val_nll": total / tokens, "val_bits_per_token": total / tokens / np.log(2.0), "val_tokens": tokens}


def first_stage_for_samples(config, stages, fingerprints):
    """(vq, params) to decode sample grids: the loaded first stage, or with a code cache the one named in
    the config (None when there is none), which must be the one the cache was encoded with: the export's
    net2net.json names it for sampling too."""
    if stages[0] is not None:
        return stages[0][0], stages[1][0]
    if not config.first_stage.checkpoint:
        return None
    vq, params = load_vqgan(config.first_stage.checkpoint, config.first_stage.config)
    encoded_with, now = fingerprints["first_stage"], fingerprint(params)
    if encoded_with and now != encoded_with:
        raise ValueError(f"first_stage.checkpoint={config.first_stage.checkpoint!r} holds other weights ({now}) "
                         f"than the first stage data.codes was encoded with ({encoded_with}): its sample grids, "
                         f"and sampling from the export, would decode the codes with the wrong VQGAN")
    return vq, params


def sample_grid(config, gpt, params, batch, stages, first, rng):
    """Samples codes for the conditions of the batch's first `sample_n` rows (top-k 100) and decodes them
    -> images [n, H, W, 3] in [-1, 1]."""
    from vqgan_jax.sampling import sample
    from vqgan_jax.train.transformer import batch_tokens

    rows = jax.tree.map(lambda a: a[:config.sample_n], batch)
    codes, cond = batch_tokens(config, rows, *stages)
    vq, vq_params = first
    drawn = sample(gpt, params, cond, steps=codes.shape[1], rng=rng, top_k=100, num_codes=vq.n_embed)
    side = int(round(codes.shape[1] ** 0.5))
    return vq.apply({"params": vq_params}, drawn.reshape(-1, side, side), method=vq.decode_indices)


def export_meta(config) -> dict:
    """export/net2net.json: what sampling needs beside the GPT. Stage paths are made absolute, so that
    `sample.py --workdir` works from any directory."""
    def stage(c):
        c = c.to_dict()
        for path in ("checkpoint", "config"):
            if c.get(path) and os.path.exists(c[path]):
                c[path] = os.path.abspath(c[path])
        return c

    return {"first_stage": stage(config.first_stage), "cond_stage": stage(config.cond_stage),
            "data_size": config.data.size, "cond_drop": config.cond_drop}


def run(config, workdir: str, allow_config_changes: bool = False):
    """Trains until `config.total_steps`, resuming from the last checkpoint in `workdir` if there is one
    (refused if the config changed since, unless `allow_config_changes`). Raises `Interrupted` when a
    signal stopped it first."""
    os.makedirs(workdir, exist_ok=True)
    mesh, gpt, tx, shardings, checkpointer, state, stages, fingerprints = _open(config, workdir,
                                                                               allow_config_changes)
    with runner.closed_on_error(checkpointer):
        first = first_stage_for_samples(config, stages, fingerprints)
        source = _train_batches(config, int(state.step))
        write_stages(fingerprints, workdir)
    train_step = jit_train_step(gpt, tx, config, mesh, shardings, stages[0])

    def after_step(step, state, batch, writer):
        if config.eval_every and step % config.eval_every == 0 and step < config.total_steps:
            nll = validation_nll(config, gpt, state.params, stages, mesh)
            if nll:
                writer.write_scalars(step, nll)
        if first and (config.sample_every and step % config.sample_every == 0 or step == config.total_steps):
            images = sample_grid(config, gpt, state.params, batch, stages, first, jax.random.PRNGKey(step))
            writer.write_images(step, "samples", np.asarray(jax.device_get(images)))

    def finish(step, state, writer):
        params = jax.device_get(jax.jit(lambda t: t, out_shardings=replicated(mesh))(state.params))
        export = os.path.join(workdir, "export")
        save_pretrained(os.path.join(export, "gpt"), gpt, {"params": params})
        if jax.process_index() == 0:
            with open(os.path.join(export, "net2net.json"), "w") as f:
                json.dump(export_meta(config), f, indent=2)
        # After the export: validation data that fails to load must not keep the model from it.
        nll = validation_nll(config, gpt, state.params, stages, mesh)
        if nll:
            writer.write_scalars(step, nll)

    return runner.train(config, workdir, mesh, checkpointer, state, source, lambda step: train_step,
                        (stages[1],), after_step, finish)


def evaluate(config, workdir: str) -> dict:
    """Validation NLL of the last checkpoint, written to `workdir/eval_<step>.json`."""
    runner.require_checkpoint(workdir)
    mesh, gpt, _, _, checkpointer, state, stages, _ = _open(config, workdir)
    checkpointer.close()
    result = validation_nll(config, gpt, state.params, stages, mesh)
    if result is None:
        raise ValueError("no validation data: set data.eval_codes (with a code cache) or the image data")
    result["step"] = int(state.step)
    write_eval(result, workdir)
    return result
