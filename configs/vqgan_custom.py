"""VQGAN on your own images (the original's configs/custom_vqgan.yaml).

  python train.py --config configs/vqgan_custom.py --config.data.path=/my/images --workdir runs/custom
  python train.py --config configs/vqgan_custom.py:runlocal --config.data.path=/my/images --workdir runs/x
"""

from vqgan_jax.train.config import default_config, is_runlocal, runlocal


def get_config(arg=None):
    c = default_config()
    c.batch_size = 5
    c.loss.disc_start = 10000
    c.loss.disc_weight = 0.8
    c.data.random_crop = False  # the original's data class takes the centre crop
    return runlocal(c) if is_runlocal(arg) else c
