"""`run(config, workdir)`: the VQGAN training loop; `evaluate(config, workdir)`: metrics over a split.

The run's opening and step loop are `runner`'s; this module adds the VQGAN's own parts: its models and
LPIPS weights, one compiled step per phase of the loss, reconstructions in the log, and the generator's
export.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import data
from vqgan_jax.metrics import EvalAccumulator
from vqgan_jax.models import load_lpips_params
from vqgan_jax.pretrained import save_pretrained
from vqgan_jax.train import codebook, runner
from vqgan_jax.train.sharding import batch_sharding, replicated
from vqgan_jax.train.state import build_models, create_state, state_shapes
from vqgan_jax.train.steps import jit_train_step, make_eval_step, model_input, phase
from vqgan_jax.train.workdir import write_eval


def label_colours(maps):
    """maps: [B, H, W, n_labels] one-hot or logits -> [B, H, W, 3] in [-1, 1]: each label's fixed colour
    (a random palette drawn once, as the original's random `colorize` projection)."""
    palette = jax.random.uniform(jax.random.PRNGKey(0), (maps.shape[-1], 3), minval=-1.0, maxval=1.0)
    return palette[jnp.argmax(maps, axis=-1)]


def _open(config, workdir, allow_config_changes: bool | None = None):
    """-> (mesh, models, lpips_params, shardings, checkpointer, state): `runner.open_run` for the VQGAN."""
    codebook.check_config(config)
    runner.initialize_distributed(config)  # before the LPIPS weights start a JAX backend
    models = build_models(config)
    lpips_params = load_lpips_params(config.lpips_path or None)  # a bad path fails before the state is built
    mesh, checkpointer, state, shardings = runner.open_run(
        config, workdir, functools.partial(state_shapes, models, config),
        functools.partial(create_state, models, config), allow_config_changes)
    return mesh, models, jax.device_put(lpips_params, replicated(mesh)), shardings, checkpointer, state


def run(config, workdir: str, allow_config_changes: bool = False):
    """Trains until `config.total_steps`, resuming from the last checkpoint in `workdir` if there is one
    (refused if the config changed since, unless `allow_config_changes`). Raises `Interrupted` when a
    signal stopped it first."""
    os.makedirs(workdir, exist_ok=True)
    mesh, models, lpips_params, shardings, checkpointer, state = _open(config, workdir, allow_config_changes)
    with runner.closed_on_error(checkpointer):
        source = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                     start_step=int(state.step))
    repl = replicated(mesh)
    steps = {}

    def train_step(step):  # one compiled step per phase of the loss (before and after disc_start...)
        key = phase(step, config.loss)
        if key not in steps:
            steps[key] = jit_train_step(models, config, mesh, shardings, *key)
        return steps[key]

    # Inputs beside reconstructions, gathered onto every host: the batch is sharded across them.
    @functools.partial(jax.jit, out_shardings=repl)
    def reconstruct(params, batch):
        x = model_input(config, batch)[:8]
        pairs = jnp.concatenate([x, models.vq.apply({"params": params}, x)[0]])
        return label_colours(pairs) if config.image_key == "segmentation" else pairs

    def after_step(step, state, batch, writer):
        if config.image_every and (step % config.image_every == 0 or step == config.total_steps):
            pairs = reconstruct(state.gen_params, batch)
            writer.write_images(step, "reconstructions", np.asarray(jax.device_get(pairs)))

    def finish(step, state, writer):
        params = state.ema_params if state.ema_params is not None else state.gen_params
        params = jax.device_get(jax.jit(lambda tree: tree, out_shardings=repl)(params))
        save_pretrained(os.path.join(workdir, "export", "vqgan"), models.vq, {"params": params})

    return runner.train(config, workdir, mesh, checkpointer, state, source, train_step, (lpips_params,),
                        after_step, finish)


def reconstruction_metrics(models, config, params, lpips_params, mesh, split: str | None = None) -> dict:
    """EvalAccumulator's result for the generator `params` over the evaluation split (the first
    `config.eval_batches` batches when set). Each host reads its own rows; the batch is put together over
    `mesh` and every host gets every row's metrics back."""
    eval_step = make_eval_step(models)
    step_fn = jax.jit(lambda p, batch, lp: (*eval_step(p, batch["image"], lp), batch["mask"]),
                      in_shardings=(None, batch_sharding(mesh), replicated(mesh)), out_shardings=replicated(mesh))
    acc = EvalAccumulator()
    for i, batch in enumerate(data.eval_iterator(config.data, batch_size=config.batch_size, split=split)):
        if config.eval_batches and i >= config.eval_batches:
            break
        rows = {"image": batch["image"], "mask": batch.get("mask", np.ones(len(batch["image"]), bool))}
        per_image, idx, mask = jax.device_get(step_fn(params, data.to_global(rows, batch_sharding(mesh)),
                                                      lpips_params))
        acc.update(idx, mask=mask, **per_image)
    return acc.result(config.model.n_embed)


def evaluate(config, workdir: str, split: str | None = None) -> dict:
    """PSNR, LPIPS and codebook usage of the last checkpoint's generator (EMA if kept) over a split;
    written to `workdir/eval_<step>.json`."""
    if config.image_key == "segmentation":
        raise ValueError("--mode eval measures PSNR/LPIPS of images; a segmentation VQGAN's training log has "
                         "its nll_loss (the BCE) and pixel_accuracy")
    runner.require_checkpoint(workdir)
    mesh, models, lpips_params, _, checkpointer, state = _open(config, workdir)
    checkpointer.close()
    params = state.ema_params if state.ema_params is not None else state.gen_params
    result = dict(reconstruction_metrics(models, config, params, lpips_params, mesh, split), step=int(state.step))
    write_eval(result, workdir)
    return result
