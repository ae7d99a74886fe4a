"""VQGAN f16 on faces: `vqgan_faceshq` with the improved codebook (l2-normalised 8-dimensional codes, restarted
when unused) and LlamaGen's tokenizer recipe (`llamagen_recipe` lists it); its batch size and disc_start, the
learning rate scaled to the batch.

  python train.py --config configs/vqgan_faceshq_l2.py --config.data.path=faceshq_train.txt --workdir runs/faces_l2
"""

from vqgan_jax.train.config import is_runlocal, llamagen_recipe, runlocal, sibling_config


def get_config(arg=None):
    c = llamagen_recipe(sibling_config(__file__, "vqgan_faceshq"))
    return runlocal(c) if is_runlocal(arg) else c
