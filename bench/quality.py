"""Reconstruction quality at equal steps, our side of `../shared/bench/quality_original.py`.

  python -m bench.quality --data ../shared/data/coco_train100 --n-train 80 --steps 200 --batch 8 --variant l2

Trains the `vqgan_train_step` workload's VQGAN (discriminator off, as that script's default) on the first
--n-train images by sorted name and evaluates on the rest; the recipe is the original's (PyTorch's
initialisation, learning rate 4.5e-6 x batch, Adam (0.5, 0.9), L1 + LPIPS with the dropout of its train
mode, legacy codebook loss) with the codebook of --variant:
  faithful    the original's quantiser
  l2          l2-normalised 8-dimensional codes
  ema         EMA codebook (decay 0.99), codes unused for 10 steps restarted
  l2_restart  l2-normalised 8-dimensional codes, codes unused for 10 steps restarted
Prints one JSON line: psnr, lpips, l1 (clipped reconstructions of the centre crops, as the original's
script), codes used over the last 50 training batches, eval codebook usage and perplexity, and seconds
per step (mean of the last 50, each step waited for, compile excluded).
"""

import argparse
import collections
import json
import os
import tempfile
import time

import jax
import numpy as np

from bench.run import load_workloads, peak_rss_mb

# Config overrides of each variant; "l2_restart" is `improved_codebook` itself, applied in build_config.
VARIANTS = {
    "faithful": {},
    "l2": {"codebook.restart_dead": 0},  # improved_codebook without its restarts
    "ema": {"codebook.ema": True, "codebook.restart_dead": 10, "model.legacy": False},
    "l2_restart": {},
}


def build_config(workload: dict, variant: str, train_list: str, eval_list: str, steps: int, batch: int, seed: int,
                 overrides=()):
    from vqgan_jax.train.config import default_config, improved_codebook

    c = default_config()
    model = dict(workload["model"])
    model.update(ch_mult=tuple(model["ch_mult"]), attn_resolutions=tuple(model["attn_resolutions"]))
    c.model.update(model)
    c.loss.update(disc_start=100_000, disc_ndf=workload["disc"]["ndf"], disc_num_layers=workload["disc"]["n_layers"])
    c.data.update(path=train_list, eval_path=eval_list, size=workload["image"][0])
    c.update(batch_size=batch, total_steps=steps, seed=seed)
    if variant in ("l2", "l2_restart"):
        improved_codebook(c)
    for key, value in [*VARIANTS[variant].items(), *overrides]:
        *sections, field = key.split(".")
        target = c
        for section in sections:
            target = target[section]
        target[field] = value
    return c


def write_lists(folder: str, n_train: int, out_dir: str) -> tuple[str, str]:
    from vqgan_jax.data import list_images

    images = list_images(os.path.abspath(folder))
    if not 0 < n_train < len(images):
        raise ValueError(f"--n-train {n_train} leaves no training or no evaluation image among {len(images)}")
    paths = []
    for name, part in (("train.txt", images[:n_train]), ("eval.txt", images[n_train:])):
        paths.append(os.path.join(out_dir, name))
        with open(paths[-1], "w") as f:
            f.write("".join(p + "\n" for p in part))
    return paths[0], paths[1]


def parse_override(text: str):
    key, _, value = text.partition("=")
    return key, json.loads(value)


def run_quality(workload: dict, variant: str, data_dir: str, n_train: int, steps: int, batch: int, seed: int,
                overrides=()) -> dict:
    """Trains `steps` steps and evaluates -> the JSON record (see the module docstring)."""
    from vqgan_jax import data
    from vqgan_jax.models import load_lpips_params
    from vqgan_jax.train import codebook
    from vqgan_jax.train.loop import reconstruction_metrics
    from vqgan_jax.train.sharding import batch_sharding, make_mesh, replicated
    from vqgan_jax.train.state import build_models, create_state
    from vqgan_jax.train.steps import jit_train_step, phase

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train_list, eval_list = write_lists(data_dir, n_train, tmp)
        config = build_config(workload, variant, train_list, eval_list, steps, batch, seed, overrides)
        codebook.check_config(config)
        mesh = make_mesh(config.mesh)
        models = build_models(config)
        state, shardings = create_state(models, config, mesh, jax.random.PRNGKey(config.seed))
        lpips_params = jax.device_put(load_lpips_params(), replicated(mesh))
        source = data.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
        batches = data.prefetch_to_device(source, batch_sharding(mesh))
        step_fn = jit_train_step(models, config, mesh, shardings, *phase(0, config.loss))
        times, compile_s = collections.deque(maxlen=50), None
        for step in range(config.total_steps):
            batch_arrays = next(batches)
            t0 = time.perf_counter()
            state, metrics = step_fn(state, batch_arrays, lpips_params)
            jax.block_until_ready(metrics)
            if step:
                times.append(time.perf_counter() - t0)
            else:
                compile_s = time.perf_counter() - t0
        batches.close()
        train_metrics = jax.device_get(metrics)

        result = reconstruction_metrics(models, config, state.gen_params, lpips_params, mesh)
    return {
        "variant": variant, "overrides": dict(overrides), "steps": steps, "batch": batch, "seed": seed,
        **{k: result[k] for k in ("psnr", "lpips", "l1", "codes_used", "perplexity", "num_images")},
        "eval_codebook_usage": result["codebook_usage"],
        "train_codes_used_last50": int(train_metrics["codes_used_window"]),
        "train_rec_loss_last": float(train_metrics["rec_loss"]),
        "s_per_step_last50": float(np.mean(times)) if times else None, "compile_s": round(compile_s, 1),
        "total_s": round(time.perf_counter() - t_start, 1), "peak_rss_mb": round(peak_rss_mb()),
        "device": jax.devices()[0].device_kind,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--n-train", type=int, default=80)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="faithful")
    ap.add_argument("--set", action="append", default=[], type=parse_override,
                    help='extra config override, e.g. --set codebook.restart_dead=20 or --set param_init=\'"flax"\' '
                         '(value as JSON)')
    ap.add_argument("--workload", default="vqgan_train_step")
    args = ap.parse_args()
    record = run_quality(load_workloads()[args.workload], args.variant, args.data, args.n_train, args.steps,
                         args.batch, args.seed, args.set)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
