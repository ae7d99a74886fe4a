"""VQGAN f16, 1024 codes on ImageNet (the original's configs/imagenet_vqgan.yaml), from TFDS.

  python train.py --config configs/vqgan_imagenet_f16_1024.py --config.data.data_dir=/tfds --workdir runs/in1k
"""

from vqgan_jax.train.config import default_config, is_runlocal, runlocal


def get_config(arg=None):
    c = default_config()
    c.data.name = "imagenet2012"
    c.batch_size = 12
    c.loss.disc_start = 250001
    c.loss.disc_weight = 0.8
    return runlocal(c) if is_runlocal(arg) else c
