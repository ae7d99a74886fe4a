"""Segmentation-conditioned transformer for S-FLCKR landscapes: condition = the codes of the segmentation
VQGAN (configs/vqgan_sflckr_seg.py) over the label map, then the image VQGAN's codes, one shared
vocabulary of 1024. GPT as the original's FacesHQ/scene models (24 layers, 16 heads, 1024 wide; block 512
holds 256 condition + 256 image codes at 256 px and f=16).

  # 1. segmentation VQGAN, 2. image VQGAN, 3. code cache, 4. transformer
  python train.py --config configs/vqgan_sflckr_seg.py --config.data.path=$D/images \
      --config.data.segmentation_path=$D/segmentations --workdir runs/seg
  python train.py --config configs/vqgan_custom.py --config.data.path=$D/images --workdir runs/vq
  python -m vqgan_jax.data.encode --config configs/transformer_sflckr.py --config.data.path=$D/images \
      --config.data.segmentation_path=$D/segmentations --out runs/codes
  python train.py --config configs/transformer_sflckr.py --config.data.codes=runs/codes --workdir runs/gpt
"""

from vqgan_jax.train.config import is_runlocal
from vqgan_jax.train.gpt_config import default_config, runlocal


def get_config(arg=None):
    c = default_config()
    c.batch_size = 12
    c.data.size = 256
    c.data.n_labels = 182
    c.data.random_crop = False  # centre crops, as the original's sflckr.Examples
    c.first_stage.checkpoint = "runs/vq/export/vqgan"
    c.cond_stage.update(kind="segmentation", checkpoint="runs/seg/export/vqgan")
    c.model.update(vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024)
    if is_runlocal(arg):
        # For the :runlocal VQGANs (32 px crops, f=2, 128 codes): 256 + 256 tokens.
        c = runlocal(c)
        c.data.size = 32
        c.model.update(vocab_size=128, block_size=512)
    return c
