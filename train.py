"""Train (or evaluate) a VQGAN, or a transformer on a VQGAN's codes (configs with stage="transformer").

  python train.py --config configs/vqgan_custom.py:runlocal --config.data.path=/my/images \
      --config.total_steps=200 --workdir runs/x
  python train.py --config configs/vqgan_custom.py --workdir runs/x --mode eval
  python train.py --config configs/transformer_custom.py:runlocal \
      --config.first_stage.checkpoint=runs/x/export/vqgan --config.data.path=/my/images --workdir runs/gpt

Every config field can be overridden with --config.<field>=<value>; an unknown field or a value of the
wrong type fails before anything runs. A run resumes from the last checkpoint in --workdir, with the config
it was started with (or pass --allow_config_changes). Stopped by SIGTERM or SIGINT, it saves and exits with
128 + the signal's number (143, 130), as a process killed by it: not finished, to be run again. A run whose
state holds NaN or inf stops at its next log step or save without saving it (`Diverged`, naming its last
checkpoint).
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "experiment config file, e.g. configs/demo.py[:arg]", lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, images and the exported model")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train, or evaluate the last checkpoint")
flags.DEFINE_bool("allow_config_changes", False,
                  "resume a run whose config, or a transformer run's frozen stage weights, changed since it started")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # Orbax logs every save and restore at INFO: --verbosity=0 shows them
        logging.set_verbosity(logging.WARNING)
    from vqgan_jax import train  # after flag parsing: a bad override fails before JAX starts

    config = FLAGS.config
    if FLAGS.mode == "train":
        try:
            train.run(config, FLAGS.workdir, FLAGS.allow_config_changes)
        except train.Interrupted as stopped:
            print(stopped, file=sys.stderr, flush=True)
            sys.exit(128 + stopped.signum)
    else:
        print(json.dumps(train.evaluate(config, FLAGS.workdir)))


if __name__ == "__main__":
    app.run(main)
