"""The demo's second stage: a small unconditional GPT over the codes of the demo VQGAN
(configs/demo.py, which must have run first), on the same scikit-image photographs; the frozen VQGAN
encodes each batch inside the training step.

  python train.py --config configs/demo_transformer.py --workdir runs/demo_gpt

Writes runs/demo_gpt/metrics.jsonl (loss and bits per token, validation bits per token at the end) and
the trained GPT in runs/demo_gpt/export/gpt.
"""

from vqgan_jax.train.config import is_runlocal
from vqgan_jax.train.gpt_config import default_config


def get_config(arg=None):
    c = default_config()
    c.data.path = "skimage:"
    c.data.size = 32
    c.data.flip = True
    c.first_stage.checkpoint = "runs/demo/export/vqgan"
    c.cond_stage.update(kind="sos", sos_token=0)
    # The demo VQGAN: 256 codes, f=4 -> 8 x 8 codes; SOS + 64 codes - 1 = 64 positions.
    c.model.update(vocab_size=256, block_size=64, n_layer=4, n_head=4, n_embd=128)
    c.batch_size = 16
    c.total_steps = 200
    c.log_every = 25
    c.checkpoint_every = 100
    c.eval_batches = 4
    c.optim.base_learning_rate = 2.5e-5  # x 16 = 4e-4
    if is_runlocal(arg):
        c.total_steps = 20
    return c
