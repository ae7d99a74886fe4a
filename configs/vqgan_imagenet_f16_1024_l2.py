"""VQGAN f16, 1024 codes on ImageNet, with the improved codebook: `vqgan_imagenet_f16_1024` with
l2-normalised 8-dimensional codes, restarted when unused for 10 steps (`improved_codebook`), and the rest
of LlamaGen's tokenizer recipe (Sun et al. 2024): codebook loss + 0.25 x commitment, Adam (0.9, 0.95) at
1e-4 for batch 128, gradient clipping at 1, L2 + LPIPS reconstruction loss, GAN weight fixed at 0.5.
Batch 128 and disc_start 20000, as LlamaGen.
The original has no such quantiser: this model does not export to its checkpoint format.

  python train.py --config configs/vqgan_imagenet_f16_1024_l2.py --config.data.data_dir=/tfds --workdir runs/in1k_l2
"""

from vqgan_jax.train.config import llamagen_recipe, runlocal, sibling_config


def get_config(arg=None):
    c = llamagen_recipe(sibling_config(__file__, "vqgan_imagenet_f16_1024"))
    c.batch_size = 128
    c.loss.disc_start = 20000
    return runlocal(c) if arg == "runlocal" else c
