"""VQGAN f16 on faces, with the improved codebook: `vqgan_faceshq` with
l2-normalised 8-dimensional codes, restarted when unused for 10 steps (`improved_codebook`), and the rest
of LlamaGen's tokenizer recipe (Sun et al. 2024): codebook loss + 0.25 x commitment, Adam (0.9, 0.95) at
1e-4 for batch 128, gradient clipping at 1, L2 + LPIPS reconstruction loss, GAN weight fixed at 0.5.
Batch size and disc_start stay the faithful config's;
the learning rate scales with the batch from LlamaGen's 1e-4 at 128.
The original has no such quantiser: this model does not export to its checkpoint format.

  python train.py --config configs/vqgan_faceshq_l2.py --config.data.path=faceshq_train.txt --workdir runs/faces_l2
"""

from vqgan_jax.train.config import llamagen_recipe, runlocal, sibling_config


def get_config(arg=None):
    c = llamagen_recipe(sibling_config(__file__, "vqgan_faceshq"))
    return runlocal(c) if arg == "runlocal" else c
