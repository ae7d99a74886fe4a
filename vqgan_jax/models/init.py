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
    Other parameters (norms, codebooks, embeddings) are returned unchanged."""
    counter = iter(range(1 << 30))

    def redraw(tree):
        if not isinstance(tree, dict):
            return tree
        kernel = tree.get("kernel")
        if kernel is None or kernel.ndim not in (2, 4):
            return {name: redraw(sub) for name, sub in sorted(tree.items())}
        bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
        layer = dict(tree)
        for name in ("kernel", "bias") if kernels else ("bias",):
            if name in layer:
                key = jax.random.fold_in(rng, next(counter))
                layer[name] = jax.random.uniform(key, layer[name].shape, layer[name].dtype, -bound, bound)
        return layer

    return redraw(params)
