"""Class-conditional ImageNet transformer at the original's size (the released cin model: 48 layers, 24
heads, 1536 wide, 16384-code vocabulary over the f16_16384 VQGAN): one class token, then 256 codes.

  python -m vqgan_jax.data.encode --config configs/transformer_imagenet_cin.py --out runs/cin_codes
  python train.py --config configs/transformer_imagenet_cin.py --config.data.codes=runs/cin_codes \
      --workdir runs/cin
"""

from vqgan_jax.train.config import is_runlocal
from vqgan_jax.train.gpt_config import default_config, runlocal


def get_config(arg=None):
    c = default_config()
    c.batch_size = 64
    c.data.name = "imagenet2012"
    c.data.label_key = "label"
    c.data.size = 256
    c.first_stage.checkpoint = "runs/imagenet_16384/export/vqgan"
    c.cond_stage.update(kind="class", n_classes=1000)
    c.model.update(vocab_size=16384, block_size=256, n_layer=48, n_head=24, n_embd=1536)
    # Parameters and Adam moments split over every device (1.4B parameters; default_config's rules); the
    # batch too.
    c.mesh = (("data", 1), ("fsdp", -1))
    if is_runlocal(arg):
        c = runlocal(c)
        c.data.size = 32
        c.mesh = (("data", -1), ("fsdp", 1))
        c.model.update(vocab_size=1000, block_size=257)
    return c
