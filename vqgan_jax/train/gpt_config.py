"""The transformer (second stage) training config: every field, with the original's defaults. Experiment
files in configs/transformer_*.py start from `default_config()`; the dict is locked, so a misspelt
override fails before anything runs."""

import ml_collections

from vqgan_jax.data import config as data_defaults


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "transformer"
    c.seed = 0
    c.batch_size = 8              # global, per optimiser update, over all hosts and devices
    c.total_steps = 100_000
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.eval_every = 0              # 0: only at the end (validation NLL in bits per token)
    c.eval_batches = 0            # 0: the whole split
    c.sample_every = 0            # sample grids (top-k 100) every this many steps; 0: only at the end
    c.sample_n = 8                # samples per grid, conditioned as the first rows of the current batch

    c.data = ml_collections.ConfigDict({k: "" if v is None else v for k, v in data_defaults.DEFAULTS.items()})
    c.data.codes = ""             # a code cache (python -m vqgan_jax.data.encode): read codes, not images
    c.data.eval_codes = ""        # the validation split's code cache

    # The frozen first stage: a saved model directory (training's export/vqgan, or a converted original
    # checkpoint), or an original .ckpt with its YAML in `config`.
    c.first_stage = ml_collections.ConfigDict(dict(checkpoint="", config=""))
    # The conditioning stage (vqgan_jax/net2net.py lists the kinds). checkpoint/config: the second VQGAN
    # of "segmentation" / "depth"; n_embed, down_factor: "coord"; sos_token: "sos"; n_classes: "class".
    c.cond_stage = ml_collections.ConfigDict(dict(
        kind="sos", checkpoint="", config="", sos_token=0, n_embed=1024, down_factor=16, n_classes=1000))

    # The original's GPT arguments; dtype is the compute dtype (parameters stay float32).
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=1024, block_size=512, n_layer=24, n_head=16, n_embd=1024, embd_pdrop=0.0,
        resid_pdrop=0.0, attn_pdrop=0.0, n_unmasked=0, dtype="float32"))
    c.pkeep = 1.0                 # probability of keeping each input code (the rest become random tokens)
    c.cond_drop = 0.0             # probability of replacing an example's condition by the null token

    c.optim = ml_collections.ConfigDict(dict(
        base_learning_rate=4.5e-6,  # x global batch size, as the original
        b1=0.9, b2=0.95, weight_decay=0.01, schedule="constant", warmup_steps=0, grad_clip=0.0,
        grad_accum=1))              # the batch is split into grad_accum micro-batches per update

    c.mesh = (("data", -1), ("fsdp", 1))  # tuples, so that the command line can override them
    # Matrices, embeddings and their Adam moments split over the fsdp axis: nothing splits while it is 1
    # (the default), so a mesh with a larger fsdp axis is all it takes. Biases and LayerNorms stay whole.
    c.sharding_rules = ((".*kernel", "fsdp"), (".*embedding", "fsdp"), (".*pos_emb", "fsdp"))
    c.distributed = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=1, process_id=0,
                                                   from_environment=False))  # as in train/config.py
    return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a config to a CPU smoke run of well under a minute."""
    c.batch_size = 4
    c.total_steps = 20
    c.log_every = 5
    c.checkpoint_every = 10
    c.eval_batches = 2
    c.model.update(n_layer=2, n_head=2, n_embd=64)
    c.optim.base_learning_rate = 1e-4  # a smoke run has no time for the original's 4.5e-6
    return c
