"""The run's config in `workdir/config.json`, and what a resumed run may change in it.

A resumed run is exact only if it trains as the first one did: a changed batch size replays or skips data
and changes the learning rate, a changed seed changes the data order, a changed loss weight changes the
model. So a run that resumes compares its config with the one saved and refuses to go on where anything
but the fields below differs, unless told to (`train.py --allow_config_changes`).
"""

import json
import os
import sys

import jax

CONFIG_FILE = "config.json"

# When and how much to log, save, evaluate and sample, how long to run (see `_may_change`), and how the
# work is laid out over devices and hosts: none of them changes what a step computes.
MAY_CHANGE = ("total_steps", "log_every", "checkpoint_every", "keep_checkpoints", "image_every", "eval_every",
              "eval_batches", "sample_every", "sample_n", "mesh", "sharding_rules", "distributed")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _may_change(field: str, config) -> bool:
    top = field.split(".")[0]
    if top == "total_steps":  # a cosine schedule's length is total_steps: the learning rate would jump
        return config.optim.get("schedule", "constant") == "constant"
    return top in MAY_CHANGE


def has_checkpoint(workdir: str) -> bool:
    checkpoints = os.path.join(workdir, "checkpoints")
    return os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints))


def config_changes(config, workdir: str) -> dict:
    """{field: (saved value, value now)} for every field of `config` that differs from the config saved in
    `workdir` and may not change on resume; {} when there is no checkpoint or no config there."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not (has_checkpoint(workdir) and os.path.exists(path)):
        return {}
    with open(path) as f:
        saved = _flat(json.load(f))
    now = _flat(json.loads(config.to_json_best_effort()))
    return {k: (saved.get(k, "<absent>"), now.get(k, "<absent>")) for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k) and not _may_change(k, config)}


def check_resume(config, workdir: str, allow_changes: bool = False) -> None:
    """Before restoring a checkpoint in `workdir`: ValueError naming every field that changed since the run
    was started, or with `allow_changes` a note of them on stderr."""
    changes = config_changes(config, workdir)
    if not changes:
        return
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    if not allow_changes:
        raise ValueError(f"{workdir!r} holds a run started with another config ({listed}). Resuming would not "
                         f"continue that run: use a new --workdir, restore those values, or pass "
                         f"--allow_config_changes to resume with them anyway")
    if jax.process_index() == 0:
        print(f"resuming {workdir!r} with config changes: {listed}", file=sys.stderr, flush=True)


def write_config(config, workdir: str) -> None:
    """Saves `config` as the run's config (first process only)."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
