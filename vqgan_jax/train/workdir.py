"""The run's config in `workdir/config.json`, and what a resumed run may change in it; a transformer run's
frozen stages in `workdir/stages.json`; `--mode eval`'s results in `workdir/eval_<step>.json`.

A resumed run is exact only if it trains as the first one did: a changed batch size replays or skips data
and changes the learning rate, a changed seed changes the data order, a changed loss weight changes the
model, a retrained first stage changes the tokens. So a run that resumes compares its config (and stages)
with the ones saved and refuses to go on where anything but the fields below differs, unless told to
(`train.py --allow_config_changes`).
"""

import json
import os
import sys

import jax

CONFIG_FILE = "config.json"
STAGES_FILE = "stages.json"  # a transformer run's frozen stages, as `stages.fingerprint` of their weights

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


def _refuse_or_note(workdir: str, changes: dict, what: str, allow_changes: bool) -> None:
    """changes: {name: (saved, now)}, non-empty; what: "another config"... ValueError naming them, or with
    `allow_changes` a note on stderr."""
    listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    if not allow_changes:
        raise ValueError(f"{workdir!r} holds a run started with {what} ({listed}). Resuming would not "
                         f"continue that run: use a new --workdir, restore those values, or pass "
                         f"--allow_config_changes to resume with them anyway")
    if jax.process_index() == 0:
        print(f"{workdir!r}: going on with {what}: {listed}", file=sys.stderr, flush=True)


def check_resume(config, workdir: str, allow_changes: bool = False) -> None:
    """Before restoring a checkpoint in `workdir`: ValueError naming every field that changed since the run
    was started, or with `allow_changes` a note of them on stderr."""
    changes = config_changes(config, workdir)
    if changes:
        _refuse_or_note(workdir, changes, "another config", allow_changes)


def check_stages(fingerprints: dict, workdir: str, allow_changes: bool = False) -> None:
    """A resumed transformer run must read the tokens it started with, but a stage retrained or replaced
    under the same path leaves the config as it was. fingerprints: {stage: fingerprint or None}, now.
    As `check_resume`, for each stage whose weights differ from the ones the run recorded."""
    saved = _saved_stages(workdir)
    changes = {k: (saved[k], now) for k, now in fingerprints.items() if saved.get(k) and now and saved[k] != now}
    if changes:
        _refuse_or_note(workdir, changes, "other frozen stage weights", allow_changes)


def _saved_stages(workdir: str) -> dict:
    """The fingerprints the run recorded; none without a checkpoint (a run that never saved one has
    nothing to continue)."""
    path = os.path.join(workdir, STAGES_FILE)
    if not (has_checkpoint(workdir) and os.path.exists(path)):
        return {}
    with open(path) as f:
        return json.load(f)


def write_stages(fingerprints: dict, workdir: str) -> None:
    """Records the run's stage fingerprints (first process only), keeping a recorded one where a stage's is
    unknown now (an older code cache): the next resume still checks it. Written by rename, as the other
    hosts may be reading it."""
    if jax.process_index() == 0:
        saved = _saved_stages(workdir)
        merged = {k: now or saved.get(k) for k, now in fingerprints.items()}
        path = os.path.join(workdir, STAGES_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(merged, f, indent=2)
        os.replace(path + ".tmp", path)


def write_config(config, workdir: str) -> None:
    """Saves `config` as the run's config (first process only)."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def write_eval(result: dict, workdir: str) -> None:
    """`--mode eval`'s result as `workdir/eval_<result["step"]>.json` (first process only)."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_{result['step']}.json"), "w") as f:
            json.dump(result, f, indent=2)
