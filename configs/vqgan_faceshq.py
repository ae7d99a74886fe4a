"""VQGAN f16 on faces (the original's configs/faceshq_vqgan.yaml). FacesHQ (CelebA-HQ + FFHQ) has no TFDS
builder: list its images in a text file.

  python train.py --config configs/vqgan_faceshq.py --config.data.path=faceshq_train.txt --workdir runs/faces
"""

from vqgan_jax.train.config import default_config, is_runlocal, runlocal


def get_config(arg=None):
    c = default_config()
    c.batch_size = 3
    c.model.n_embed = 1024
    c.loss.disc_start = 30001
    c.loss.disc_weight = 0.8
    c.loss.codebook_weight = 1.0
    return runlocal(c) if is_runlocal(arg) else c
