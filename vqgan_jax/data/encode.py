"""Encode a dataset once into a code cache for transformer training.

  python -m vqgan_jax.data.encode --config configs/transformer_sflckr.py --out runs/sflckr_codes
  python -m vqgan_jax.data.encode --config configs/transformer_sflckr.py --out runs/sflckr_codes_val --split eval

The config is a transformer config: its `first_stage` and `cond_stage` encode, its `data` block reads
(training crops and flips for --split train, `--passes` times over the data; center crops of the
evaluation data for --split eval). Each host encodes its own part of the data and writes its own shards.
"""

import json
import math
import os

import jax
import numpy as np

from vqgan_jax.data.codes import META, CodeWriter


def _local_rows(x) -> np.ndarray:
    """This host's rows of a batch-sharded global array, in order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:  # replicas along other mesh axes hold the same rows
            seen.add(start)
            rows.append(np.asarray(s.data))
    return np.concatenate(rows)


def _remove_cache_files(out: str, process_index: int, process_count: int) -> None:
    """Clears what an earlier encode into `out` left (a finished cache being overwritten, or the shards of a
    killed run), so that no old shard is read with the new ones: the meta data first, so that the
    directory never looks complete meanwhile; each host its own shards, the first host also those of hosts
    the earlier run had and this one lacks."""
    if not os.path.isdir(out):
        return
    if process_index == 0 and os.path.exists(os.path.join(out, META)):
        os.remove(os.path.join(out, META))
    for name in os.listdir(out):
        prefix, _, rest = name.lstrip(".").partition("-")
        host = rest.split("-")[0]
        if prefix in ("codes", "cond") and host.isdigit() and (
                int(host) == process_index or (process_index == 0 and int(host) >= process_count)):
            os.remove(os.path.join(out, name))


def encode(config, out: str, split: str = "train", passes: float = 1.0, overwrite: bool = False) -> dict:
    """Writes the cache to `out` and returns its meta data."""
    from vqgan_jax import data
    from vqgan_jax.train.runner import initialize_distributed
    from vqgan_jax.train.sharding import batch_sharding, make_mesh, replicated
    from vqgan_jax.train.stages import check_config, load_stages, stage_fingerprints, token_counts
    from vqgan_jax.train.transformer import batch_tokens

    if split not in ("train", "eval"):
        raise ValueError(f"--split must be 'train' or 'eval', got {split!r}")
    if os.path.exists(os.path.join(out, META)) and not overwrite:
        raise FileExistsError(f"{out!r} already holds a code cache; pass --overwrite to replace it")
    check_config(config)
    initialize_distributed(config)
    mesh = make_mesh([("data", -1)])
    stage_models, stage_params = load_stages(config)
    fingerprints = stage_fingerprints(stage_params)
    _remove_cache_files(out, jax.process_index(), jax.process_count())  # only once the stages load
    stage_params = jax.device_put(stage_params, replicated(mesh))
    encode_batch = jax.jit(lambda batch, params: batch_tokens(config, batch, stage_models, params),
                           in_shardings=(batch_sharding(mesh), replicated(mesh)),
                           out_shardings=(batch_sharding(mesh), batch_sharding(mesh)))
    b = config.batch_size
    if split == "train":
        iterator = data.train_iterator(config.data, global_batch_size=b, seed=config.seed)
        batches = (next(iterator) for _ in range(math.ceil(passes * iterator.examples_per_epoch / b)))
    else:
        batches = data.eval_iterator(config.data, batch_size=b)

    writer = CodeWriter(out, max(config.model.vocab_size, 1), jax.process_index())
    shapes = None
    for batch in batches:
        numeric = {k: v for k, v in batch.items() if k != "mask"}
        codes, cond = encode_batch(data.to_global(numeric, batch_sharding(mesh)), stage_params)
        codes, cond = _local_rows(codes), _local_rows(cond)
        factor = stage_models[0].downsample_factor
        shapes = ((batch["image"].shape[1] // factor, batch["image"].shape[2] // factor), int(cond.shape[1]))
        keep = batch["mask"] if "mask" in batch else np.ones(len(codes), bool)
        writer.add(codes[keep].reshape(-1, *shapes[0]), cond[keep])
    writer.close()
    counts = np.asarray([writer.count])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        counts = multihost_utils.process_allgather(counts)
    meta = {"num_examples": int(np.sum(counts)), "code_shape": list(shapes[0]), "cond_length": shapes[1],
            "vocab_size": config.model.vocab_size, "cond_kind": config.cond_stage.kind, "split": split,
            **dict(zip(("first_stage_codes", "cond_tokens"), token_counts(config, *stage_models))),
            "passes": passes if split == "train" else 1,
            "first_stage": config.first_stage.checkpoint, "cond_stage": config.cond_stage.checkpoint,
            **{f"{stage}_fingerprint": value for stage, value in fingerprints.items()},
            "data": config.data.to_dict()}
    if jax.process_index() == 0:
        with open(os.path.join(out, META), "w") as f:
            json.dump(meta, f, indent=2, default=str)
    return meta


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a transformer config file", lock_config=True)
    flags.DEFINE_string("out", None, "directory for the cache")
    flags.DEFINE_enum("split", "train", ["train", "eval"], "training crops, or the evaluation data")
    flags.DEFINE_float("passes", 1.0, "training split: passes over the data (each with fresh random crops)")
    flags.DEFINE_bool("overwrite", False, "replace a cache already in --out")
    flags.mark_flags_as_required(["config", "out"])

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        f = flags.FLAGS
        meta = encode(f.config, f.out, f.split, f.passes, f.overwrite)
        print(json.dumps({k: meta[k] for k in ("num_examples", "code_shape", "cond_length", "split")}))

    app.run(run, argv)


if __name__ == "__main__":
    main()
