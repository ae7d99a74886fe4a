"""2-D convolution (NHWC, HWIO) with explicit padding: the layer every model uses.

On CPU the kernel gradient is computed over horizontal strips of the map stacked on the batch axis.
XLA:CPU runs a kernel gradient as a convolution whose "depth" is the batch: with few images it runs at
a third to a half of the forward's speed (31 ms against 16 ms at [4, 64, 64, 64]); cutting the map into
strips so that images x strips reaches 16 brings it to the forward's speed (17 ms; the VQGAN step of
the benchmark 2.75 s -> 2.5-2.6 s). Other backends keep the native gradient. Values are the same up to
float rounding.
"""

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]
_DIMS = ("NHWC", "HWIO", "NHWC")
_STRIP_DEPTH = 16  # images x strips that the CPU kernel gradient aims for


def _conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMS)


def _kernel_grad(x, w, g, strides, padding):
    """XLA's own kernel gradient: d(loss)/d(w) for the cotangent g of _conv(x, w)."""
    return jax.vjp(lambda w_: _conv(x, w_, strides, padding), w)[1](g)[0]


def _strips(batch: int, rows: int) -> int:
    """How many strips to cut `rows` output rows into: the smallest divisor of rows with batch x strips
    >= _STRIP_DEPTH, at most one strip per row, 1 when the batch alone reaches it."""
    want = -(-_STRIP_DEPTH // batch)
    return next((n for n in range(want, rows + 1) if rows % n == 0), rows) if want > 1 else 1


def _kernel_grad_strips(x, w, g, strides, padding):
    """d(loss)/d(kernel) with the output rows cut into strips, each with the input rows it reads,
    stacked on the batch axis; one kernel-gradient convolution over them.
    x: [B, H, W, Cin], w: [kh, kw, Cin, Cout], g: [B, H', W', Cout] -> [kh, kw, Cin, Cout]."""
    b, ho = g.shape[:2]
    n = _strips(b, ho)
    if n == 1:
        return _kernel_grad(x, w, g, strides, padding)
    sh, h, kh = strides[0], ho // n, w.shape[0]
    x = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0)))
    span = (h - 1) * sh + kh
    xs = jnp.concatenate([lax.slice_in_dim(x, i * h * sh, i * h * sh + span, axis=1) for i in range(n)])
    gs = jnp.concatenate([lax.slice_in_dim(g, i * h, (i + 1) * h, axis=1) for i in range(n)])
    return _kernel_grad(xs, w, gs, strides, ((0, 0), padding[1]))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, w, strides: tuple[int, int], padding: Padding):
    """x: [B, H, W, Cin], w: [kh, kw, Cin, Cout], padding ((top, bottom), (left, right))
    -> [B, H', W', Cout]."""
    return _conv(x, w, strides, padding)


def _conv2d_fwd(x, w, strides, padding):
    return _conv(x, w, strides, padding), (x, w)


def _weight_grad(x, w, g, strides, padding):
    """d(loss)/d(w): over row strips on CPU, XLA's own kernel gradient elsewhere."""
    return lax.platform_dependent(x, g, cpu=lambda x, g: _kernel_grad_strips(x, w, g, strides, padding),
                                  default=lambda x, g: _kernel_grad(x, w, g, strides, padding))


def _conv2d_bwd(strides, padding, residuals, g):
    x, w = residuals
    dx = jax.vjp(lambda x_: _conv(x_, w, strides, padding), x)[1](g)[0]
    return dx, _weight_grad(x, w, g, strides, padding)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def flip_transpose(w):
    """w: [kh, kw, Cin, Cout] -> [kh, kw, Cout, Cin], mirrored in space: for a stride-1 convolution, the
    kernel whose convolution with the output's cotangent is the input's gradient."""
    return jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv2d_given_dx_kernel(x, w, w_dx, padding: Padding):
    """Stride-1 `conv2d(x, w)` whose input gradient convolves with `w_dx` = flip_transpose(w), passed in
    rather than computed from w. For a frozen network (LPIPS's VGG16) w_dx is computed once: XLA:CPU
    transposes kernels at ~1.5 GB/s, so deriving it inside the training step costs ~40 ms a step for
    VGG16's 59 MB. The gradient for w is w's own; w_dx gets none (the value does not depend on it)."""
    return _conv(x, w, (1, 1), padding)


def _given_dx_fwd(x, w, w_dx, padding):
    return _conv(x, w, (1, 1), padding), (x, w, w_dx)


def _given_dx_bwd(padding, residuals, g):
    x, w, w_dx = residuals
    (kh, kw), ((top, bottom), (left, right)) = w.shape[:2], padding
    dx = _conv(g, w_dx, (1, 1), ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)))
    return dx, _weight_grad(x, w, g, (1, 1), padding), jnp.zeros_like(w_dx)


conv2d_given_dx_kernel.defvjp(_given_dx_fwd, _given_dx_bwd)


@jax.custom_vjp
def add_bias(y, bias):
    """y: [..., C] + bias: [C]. Its gradient sums the cotangent over every position as a product with a
    vector of ones: XLA:CPU's reduction over batch and positions together runs 2-5x slower (1.1 -> 0.4 ms
    at [4, 64, 64, 64], 3.8 -> 0.7 ms at [4, 64, 64, 128])."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def column_sum(t):
    """t: [..., C] -> [C] float32, the sum over every other axis, as a product with a vector of ones:
    XLA:CPU rewrites a reduction over a long major axis into a windowed one that runs several times slower."""
    rows = t.reshape(-1, t.shape[-1])
    ones = jnp.ones(rows.shape[0], rows.dtype)
    return jnp.dot(ones, rows, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _add_bias_bwd(_, g):
    return g, column_sum(g).astype(g.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Conv(nn.Module):
    """`nn.Conv` with square kernels and explicit padding ((top, bottom), (left, right)): same parameters
    (kernel HWIO, bias), same initialisers, same dtype promotion. x: [B, H, W, Cin] -> [B, H', W', features]."""
    features: int
    kernel_size: int
    strides: int = 1
    padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        y = conv2d(x, kernel, (self.strides, self.strides), tuple(tuple(p) for p in self.padding))
        if self.use_bias:
            y = add_bias(y, self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype))
        return y
