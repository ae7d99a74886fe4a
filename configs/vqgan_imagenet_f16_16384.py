"""VQGAN f16, 16384 codes on ImageNet (the released vqgan_imagenet_f16_16384), from TFDS.

  python train.py --config configs/vqgan_imagenet_f16_16384.py --config.data.data_dir=/tfds --workdir runs/in16k
"""

from vqgan_jax.train.config import default_config, is_runlocal, runlocal


def get_config(arg=None):
    c = default_config()
    c.data.name = "imagenet2012"
    c.batch_size = 12
    c.model.n_embed = 16384
    c.loss.disc_start = 0
    c.loss.disc_weight = 0.75
    return runlocal(c) if is_runlocal(arg) else c
