"""From trained (or converted) models to images: load the GPT and its stages, build the condition for a
requested size, sample the code grid (plain or windowed), decode it. Used by sample.py."""

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax import net2net
from vqgan_jax.sampling.sampler import sample
from vqgan_jax.sampling.windowed import sample_windowed


@dataclasses.dataclass
class Net2Net:
    """A trained second stage: the GPT, the first stage that decodes its codes, the condition."""
    gpt: Any
    gpt_params: Any
    vq: Any
    vq_params: Any
    cond_kind: str
    cond_config: dict
    train_size: int            # the training crop in pixels: its code grid is the window
    cond_vq: Any = None
    cond_params: Any = None
    cond_drop: float = 0.0     # as trained: classifier-free guidance needs a model that has seen the null token

    @property
    def window(self) -> int:
        return self.train_size // self.vq.downsample_factor


def converted_condition(gpt_dir: str, cond_kind: str | None = None) -> dict | None:
    """The condition of a Net2Net that `python -m vqgan_jax.convert` wrote (its manifest.json beside
    `gpt_dir`): {kind, and sos_token / n_classes / n_embed, down_factor / cond_stage as the kind needs};
    None without such a manifest."""
    path = os.path.join(os.path.dirname(os.path.abspath(gpt_dir)), "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        manifest = json.load(f)
    if "net2net" not in manifest:
        return None
    net, cond = manifest["net2net"], manifest.get("cond_stage_config")
    if "cond_stage" in manifest.get("parts", {}):
        kind = cond_kind or net.get("cond_stage_key", "depth")  # the original's default cond_stage_key
        if kind not in net2net.VQ_COND_KINDS:
            raise ValueError(f"{path}: a VQ conditioning stage on {kind!r}; say which it is with cond_kind "
                             f"(one of {net2net.VQ_COND_KINDS})")
        return dict(kind=kind, cond_stage=os.path.join(os.path.dirname(path), "cond_stage"))
    if cond == "__is_unconditional__":
        return dict(kind="sos", sos_token=net.get("sos_token", 0))  # the original's default sos_token
    target = cond.get("target", "") if isinstance(cond, dict) else str(cond)
    params = (cond.get("params") or {}) if isinstance(cond, dict) else {}
    name = target.rsplit(".", 1)[-1]
    if name == "SOSProvider":
        return dict(kind="sos", sos_token=params.get("sos_token", 0))
    if name == "Labelator":
        return dict(kind="class", n_classes=params.get("n_classes"))
    if name == "CoordStage":
        return dict(kind="coord", n_embed=params["n_embed"], down_factor=params["down_factor"])
    raise ValueError(f"{path}: the conditioning stage {target!r} is none that vqgan-jax samples")


def largest_window(gpt, cond_kind: str) -> int:
    """The side w of the largest square code grid whose sequence fits the GPT's block_size: 1 condition token
    (sos, class) or a w x w condition grid (segmentation, depth, coord), then w * w codes less the last."""
    cond_tokens = (lambda w: w * w) if cond_kind in net2net.VQ_COND_KINDS + ("coord",) else (lambda w: 1)
    w = 1
    while cond_tokens(w + 1) + (w + 1) ** 2 - 1 <= gpt.block_size:
        w += 1
    return w


def load(workdir: str | None = None, *, gpt_dir: str | None = None, first_stage: str = "",
         first_stage_config: str = "", cond_kind: str | None = None, cond_stage: str = "",
         cond_stage_config: str = "", train_size: int | None = None, sos_token: int | None = None,
         coord_n_embed: int = 1024, down_factor: int = 16, cond_drop: float = 0.0) -> Net2Net:
    """A transformer training workdir (its export/gpt and export/net2net.json), or the parts by path:
    gpt_dir (a saved GPT, e.g. converted from an original checkpoint) and the first stage; cond_drop: the
    probability the GPT was trained with (0 for the original's models).

    By parts, the condition (cond_kind, sos_token, ...) comes from the converter's manifest.json beside
    gpt_dir where there is one (a cond_kind given that differs from it is refused), else from the
    arguments (default: sos, token 0); train_size, the training crop in pixels, defaults to the largest
    square window that the GPT's block_size holds."""
    from vqgan_jax.pretrained import load_pretrained
    from vqgan_jax.train.stages import load_vqgan

    converted = converted_condition(gpt_dir, cond_kind) if gpt_dir and not workdir else None
    if converted and cond_kind not in (None, converted["kind"]):
        raise ValueError(f"{gpt_dir!r} was converted from a {converted['kind']}-conditioned Net2Net "
                         f"(manifest.json), not {cond_kind}")
    cond_config = {"kind": "sos", "sos_token": 0, "n_embed": coord_n_embed, "down_factor": down_factor,
                   **(converted or {})}
    cond_config.update({k: v for k, v in (("kind", cond_kind), ("sos_token", sos_token)) if v is not None})
    converted_stage = cond_config.pop("cond_stage", "")
    cond_stage = cond_stage or converted_stage
    if workdir:
        meta_path = os.path.join(workdir, "export", "net2net.json")
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{workdir!r} has no export/net2net.json: is it a finished transformer run?")
        with open(meta_path) as f:
            meta = json.load(f)
        gpt_dir = os.path.join(workdir, "export", "gpt")
        first_stage, first_stage_config = meta["first_stage"]["checkpoint"], meta["first_stage"]["config"]
        cond_config = dict(meta["cond_stage"])
        cond_stage, cond_stage_config = cond_config.pop("checkpoint"), cond_config.pop("config")
        train_size = meta["data_size"]
        cond_drop = meta.get("cond_drop", 0.0)
    if not gpt_dir:
        raise ValueError("give a transformer workdir, or gpt_dir and first_stage")
    gpt, variables = load_pretrained(gpt_dir)
    vq, vq_params = load_vqgan(first_stage, first_stage_config, "first_stage")
    if train_size is None:
        train_size = largest_window(gpt, cond_config["kind"]) * vq.downsample_factor
    model = Net2Net(gpt, variables["params"], vq, vq_params, cond_config["kind"], cond_config, train_size,
                    cond_drop=cond_drop)
    if model.cond_kind in net2net.VQ_COND_KINDS:
        model.cond_vq, model.cond_params = load_vqgan(cond_stage, cond_stage_config, "cond_stage")
    return model


def condition(model: Net2Net, batch: int, grid: tuple[int, int], *, classes=None, cond_image=None):
    """The condition for `batch` samples of a code grid: int [B, n] tokens (sos, class) or a grid [B, h, w]
    (coord, segmentation, depth). classes: int [B] labels; cond_image: [1, H, W] label map (int) or
    [1, H, W, 1] depth in [-1, 1] at the image size."""
    kind, c = model.cond_kind, model.cond_config
    if kind == "sos":
        return jnp.full((batch, 1), c["sos_token"], jnp.int32)
    if kind == "class":
        if classes is None:
            raise ValueError("a class-conditional model needs classes")
        n_classes = c.get("n_classes")
        if n_classes and (np.min(classes) < 0 or np.max(classes) >= n_classes):
            raise ValueError(f"classes {sorted(set(np.ravel(classes).tolist()))} outside the model's 0..{n_classes - 1}")
        return jnp.asarray(classes, jnp.int32).reshape(batch, 1)
    if kind == "coord":
        h, w = grid
        f = model.vq.downsample_factor
        crop = jnp.array([[0, 0, h * f, w * f]])
        if h != w:
            raise ValueError("coord conditioning samples square images (the positions are built for square crops)")
        tokens = net2net.coord_tokens(crop, h * f, c["n_embed"], c["down_factor"])
        return jnp.tile(tokens.reshape(1, h, w), (batch, 1, 1))
    if cond_image is None:
        raise ValueError(f"a {kind}-conditioned model needs a conditioning image (cond_image)")
    if kind == "segmentation":
        n_labels = model.cond_vq.in_channels
        if np.min(cond_image) < 0 or np.max(cond_image) >= n_labels:
            raise ValueError(f"label map values span [{np.min(cond_image)}, {np.max(cond_image)}], the "
                             f"segmentation VQGAN knows labels 0..{n_labels - 1}")
    x = jax.nn.one_hot(cond_image, model.cond_vq.in_channels) if kind == "segmentation" else cond_image
    codes = model.cond_vq.apply({"params": model.cond_params}, jnp.asarray(x), method=model.cond_vq.encode)[1]
    if tuple(codes.shape[1:]) != tuple(grid):
        raise ValueError(f"the conditioning image gives a {tuple(codes.shape[1:])} code grid, the sample is {grid}")
    return jnp.tile(codes, (batch, 1, 1))


def _given_prefix(flat):
    """flat: int [B, n] codes, -1 where to be drawn -> the given prefix [B, m]: every row must give the same
    first m codes in raster order and leave the rest to be drawn (`sample` completes a prefix; other
    masks need the sliding window's init/mask)."""
    missing = flat < 0
    m = int(np.argmax(missing[0])) if missing[0].any() else flat.shape[1]
    if missing[:, :m].any() or not missing[:, m:].all():
        raise ValueError("given codes must be a raster-order prefix, the same length in every row: codes, then -1 "
                         "from one position to the end")
    return flat[:, :m]


def generate(model: Net2Net, cond, grid: tuple[int, int], rng, *, given=None, progress: Callable | None = None,
             **sampling) -> jax.Array:
    """Samples codes [B, h, w] for `cond` and decodes them -> images [B, h*f, w*f, 3] in [-1, 1].

    A grid of the training window's size with token conditions (sos, class) is drawn in one pass
    (`sample`); a larger one, or one with a grid condition, with the sliding window; a smaller one is refused.
    Only the first stage's codes are drawn (`num_codes`). given: optional int [B, h, w] codes whose first rows (those
    above the first -1) are kept: image completion."""
    h, w = grid
    b = cond.shape[0]
    window = model.window
    if h < window or w < window:
        # The GPT's positions are raster positions of a window-wide grid: a narrower grid would give
        # them other places in the image.
        raise ValueError(f"the code grid {grid} is smaller than the training window {window}x{window}: sample "
                         f"at least the training size")
    sampling.setdefault("num_codes", model.vq.n_embed)
    if sampling.get("cfg_scale", 1.0) != 1.0 and not model.cond_drop:
        raise ValueError("classifier-free guidance needs a model trained with cond_drop > 0: this one has never "
                         "seen the null condition")
    plain = cond.ndim == 2 and (h, w) == (window, window) and cond.shape[1] + h * w - 1 <= model.gpt.block_size
    if plain:
        keep = None
        if given is not None:
            keep = jnp.asarray(_given_prefix(np.asarray(given).reshape(b, -1)))
        codes = sample(model.gpt, model.gpt_params, cond, steps=h * w, rng=rng, given=keep, **sampling)
        codes = codes.reshape(b, h, w)
    else:
        if sampling.pop("cfg_scale", 1.0) != 1.0:
            reason = (f"a {model.cond_kind} condition is sampled with the sliding window" if cond.ndim == 3 else
                      f"the grid {grid} is sampled with the sliding window")
            raise ValueError(f"classifier-free guidance needs token conditions (sos, class) at the training "
                             f"window's size, sampled in one pass; {reason}")
        init = mask = None
        if given is not None:
            given = np.asarray(given)
            mask = given < 0
            init = np.where(mask, 0, given)
        codes = sample_windowed(model.gpt, model.gpt_params, cond, shape=(h, w), rng=rng, window=window, init=init,
                                mask=mask, **sampling)
    if progress:
        progress(b)
    return model.vq.apply({"params": model.vq_params}, codes, method=model.vq.decode_indices)
