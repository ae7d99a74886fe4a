"""VQGAN f16, 16384 codes on ImageNet (LlamaGen's VQ-16 setting): `vqgan_imagenet_f16_16384` with the improved
codebook (l2-normalised 8-dimensional codes, restarted when unused) and LlamaGen's tokenizer recipe
(`llamagen_recipe` lists it); batch 128 and disc_start 20000, as LlamaGen.

  python train.py --config configs/vqgan_imagenet_f16_16384_l2.py --config.data.data_dir=/tfds --workdir runs/in16k_l2
"""

from vqgan_jax.train.config import is_runlocal, llamagen_recipe, runlocal, sibling_config


def get_config(arg=None):
    c = llamagen_recipe(sibling_config(__file__, "vqgan_imagenet_f16_16384"))
    c.batch_size = 128
    c.loss.disc_start = 20000
    return runlocal(c) if is_runlocal(arg) else c
