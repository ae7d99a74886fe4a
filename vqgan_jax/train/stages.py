"""The frozen models of transformer training: the first stage (image -> codes) and a VQGAN conditioning
stage (segmentation or depth map -> codes), loaded from our saved models or from original checkpoints."""

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.models import VQGAN
from vqgan_jax.net2net import VQ_COND_KINDS


def load_vqgan(checkpoint: str, yaml_config: str = "", what: str = "first_stage") -> tuple[VQGAN, dict]:
    """checkpoint: a directory written by `save_pretrained` (training's export/vqgan, the converter's
    output), or an original .ckpt / .npz with its YAML in `yaml_config` -> (vq, params)."""
    if not checkpoint:
        raise ValueError(f"{what}.checkpoint is not set: give a saved VQGAN directory (e.g. runs/vqgan/export/"
                         f"vqgan) or an original .ckpt with {what}.config pointing to its YAML")
    if os.path.isdir(checkpoint):
        from vqgan_jax.pretrained import load_pretrained

        model, variables = load_pretrained(checkpoint)
        if not isinstance(model, VQGAN):
            raise ValueError(f"{what}.checkpoint {checkpoint!r} holds a {type(model).__name__}, not a VQGAN")
        return model, variables["params"]
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"{what}.checkpoint {checkpoint!r} does not exist")
    if not yaml_config:
        raise ValueError(f"{what}.checkpoint {checkpoint!r} is an original checkpoint: set {what}.config to "
                         f"its YAML (the model.params with ddconfig, embed_dim, n_embed)")
    from vqgan_jax.convert import taming

    # A Net2Net's checkpoint holds both stages (`first_stage_model.*`, `cond_stage_model.*`), and its YAML
    # holds their configs: the stage asked for is taken from either.
    config = taming.read_config(yaml_config)
    net2net = taming.unwrap_config(config)
    if "transformer_config" in net2net:
        config = net2net.get(f"{what}_config")
        if not isinstance(config, dict):
            raise ValueError(f"{what}.config {yaml_config!r} is a Net2Net config whose {what}_config is "
                             f"{config!r}, not a VQ model")
    return taming.vqgan_from_taming(checkpoint, config, prefix=("", f"{what}_model."))


def load_stages(config):
    """-> ((first_vq, cond_vq), (first_params, cond_params)): modules (static) apart from their params
    (arrays, passed to the jitted step). cond_vq and cond_params are None unless the condition is a
    VQGAN's codes. Only needed when training reads images rather than a code cache."""
    vq, params = load_vqgan(config.first_stage.checkpoint, config.first_stage.config, "first_stage")
    cond_vq = cond_params = None
    if config.cond_stage.kind in VQ_COND_KINDS:
        cond_vq, cond_params = load_vqgan(config.cond_stage.checkpoint, config.cond_stage.config, "cond_stage")
    check_vocabulary(config, *token_counts(config, vq, cond_vq))
    on_device = lambda tree: None if tree is None else jax.tree.map(jnp.asarray, tree)  # noqa: E731
    return (vq, cond_vq), (on_device(params), on_device(cond_params))


def fingerprint(params) -> str | None:
    """A frozen stage's weights -> a short hash of every array (names, shapes, dtypes, values); None for no
    stage. It tells whether a stage saved under the same path was retrained or replaced since a code cache
    was encoded or a run was started."""
    if params is None:
        return None
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaf = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()[:16]


STAGES = ("first_stage", "cond_stage")  # the frozen stages, in the order `load_stages` returns them


def stage_fingerprints(stage_params) -> dict:
    """(first_params, cond_params or None) -> {"first_stage": ..., "cond_stage": ...} `fingerprint`s: the
    keys of a run's stages.json, and with `_fingerprint` appended, of a code cache's meta data."""
    return {name: fingerprint(params) for name, params in zip(STAGES, stage_params)}


def check_config(config) -> None:
    """Combinations that would train on wrong conditions, refused before anything runs."""
    from vqgan_jax.net2net import COND_KINDS

    kind = config.cond_stage.kind
    if kind not in COND_KINDS:
        raise ValueError(f"unknown cond_stage.kind {kind!r}: use one of {COND_KINDS}")
    if kind == "coord" and config.data.flip:
        raise ValueError("coord conditioning with data.flip=True: the positions would not follow the mirrored "
                         "image; set data.flip=False (the original's FacesHQ does not flip)")
    if kind == "class" and not config.data.codes and not (config.data.label_key or config.data.class_folders):
        raise ValueError("class conditioning reads each example's class: set data.label_key (a TFDS feature, "
                         "'label' for imagenet2012) or data.class_folders=True (or train on a code cache)")
    if kind == "segmentation" and not config.data.codes and not config.data.segmentation_path:
        raise ValueError("segmentation conditioning reads label maps: set data.segmentation_path (or train on "
                         "a code cache with data.codes)")


def token_counts(config, first_vq, cond_vq=None) -> tuple[int, int]:
    """-> (codes of the first stage, condition tokens): the vocabulary the GPT's inputs draw from, before
    cond_drop's null token."""
    kind = config.cond_stage.kind
    # coord tokens are round(n_embed * position) with position < 1: at most n_embed - 1 in practice.
    n_cond = {"sos": config.cond_stage.sos_token + 1, "coord": config.cond_stage.n_embed,
              "class": config.cond_stage.n_classes}.get(kind, cond_vq.n_embed if cond_vq is not None else 0)
    return first_vq.n_embed, n_cond


def check_vocabulary(config, n_first: int, n_cond: int) -> None:
    """The GPT's vocabulary must hold every image code and condition token, plus the null token when
    conditions are dropped: a token outside it would be silently clamped by the embedding lookup."""
    vocab = config.model.vocab_size
    needed = max(n_first, n_cond) + (1 if config.cond_drop > 0 else 0)
    if vocab < needed:
        reason = " (+1 for the null token of cond_drop)" if config.cond_drop > 0 else ""
        raise ValueError(f"model.vocab_size={vocab} is too small: codes and condition tokens need {needed}"
                         f"{reason}; first stage has {n_first} codes, the condition {n_cond} tokens")


def check_code_cache(config, meta: dict, field: str) -> None:
    """A code cache (`meta`: its meta.json, read from data.`field`) must have been encoded with this config's
    kind of condition and hold only tokens the GPT's vocabulary covers."""
    path = config.data[field]
    if "first_stage_codes" not in meta:
        raise ValueError(f"data.{field}={path!r} was written by an older `vqgan_jax.data.encode` that did not "
                         f"record its token counts; encode it again")
    if meta.get("cond_kind", config.cond_stage.kind) != config.cond_stage.kind:
        raise ValueError(f"data.{field}={path!r} holds {meta['cond_kind']!r} conditions, but cond_stage.kind is "
                         f"{config.cond_stage.kind!r}")
    check_vocabulary(config, meta["first_stage_codes"], meta["cond_tokens"])
