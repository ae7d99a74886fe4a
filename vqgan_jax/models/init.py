"""PyTorch's default draw for convolution and linear parameters, applied to a Flax parameter tree.

The original builds its autoencoder from `torch.nn.Conv2d`, whose default initialisation
(`kaiming_uniform_(a=sqrt(5))`) draws the kernel, and the bias too, from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
Flax's default is a lecun-normal kernel (three times the variance) and a zero bias. Over the first few
hundred steps the two starts train to visibly different reconstructions, so a faithful run redraws its
parameters the PyTorch way (`config.param_init = "torch"`).
"""

import math

import jax


def torch_default_init(params, rng: jax.Array, kernels: bool = True):
    """params: a Flax parameter tree -> the same tree with every layer that holds a 2-D (`Dense`,
    [in, out]) or 4-D (conv, [kh, kw, in, out]) `kernel` redrawn from U(-b, b), b = 1/sqrt(fan_in),
    fan_in = the product of all but the kernel's last dimension; its `bias`, if any, from the same range.
    `kernels=False` redraws the biases only (the original's discriminator sets its kernels itself).
    Other parameters (norms, codebooks, embeddings) are returned unchanged.

    All the redrawn values come from one draw of U(-1, 1), cut into the leaves and scaled by their bounds:
    XLA:CPU spends ~0.2 s compiling each random draw, which made a draw per leaf the larger part of the
    training state's compile time (26 s of a tiny VQGAN's). The one draw is of the redrawn leaves' total
    size, made whole on each device even when the state is sharded: for an autoencoder, a few hundred MB."""
    slots = []  # (layer dict to fill, parameter name, bound), in a fixed (sorted) order

    def collect(tree):
        if not isinstance(tree, dict):
            return tree
        kernel = tree.get("kernel")
        if kernel is None or kernel.ndim not in (2, 4):
            return {name: collect(sub) for name, sub in sorted(tree.items())}
        layer = dict(tree)
        bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
        slots.extend((layer, name, bound) for name in (("kernel", "bias") if kernels else ("bias",)) if name in layer)
        return layer

    out = collect(params)
    sizes = [math.prod(layer[name].shape) for layer, name, _ in slots]
    flat = jax.random.uniform(rng, (sum(sizes),), minval=-1.0, maxval=1.0)
    offset = 0
    for (layer, name, bound), size in zip(slots, sizes):
        old = layer[name]
        layer[name] = (flat[offset:offset + size].reshape(old.shape) * bound).astype(old.dtype)
        offset += size
    return out
