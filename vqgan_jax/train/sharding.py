"""Device mesh and sharding rules, both taken from the config.

`config.mesh`: axes as ((name, size), ...), one size may be -1 ("the rest"), e.g. (("data", -1), ("fsdp", 1)).
`config.sharding_rules`: ((regex, spec), ...) matched in order against a leaf's path ("gen_params/decoder/
conv_out/kernel"); spec is "replicate", "fsdp" (split the largest dimension divisible by the fsdp axis;
a leaf with none stays whole, and a warning names the large ones) or a tuple of mesh-axis names / None per
dimension. Leaves that match no rule are replicated.
Batches are split over every mesh axis.
"""

import re
import warnings

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(axes, devices=None) -> Mesh:
    devices = np.asarray(devices if devices is not None else jax.devices())
    names = [name for name, _ in axes]
    sizes = [size for _, size in axes]
    if len(set(names)) != len(names):
        raise ValueError(f"mesh {axes}: axis names must differ")
    if any(s != -1 and (not isinstance(s, int) or s < 1) for s in sizes):
        raise ValueError(f"mesh {axes}: axis sizes must be positive integers (or -1 for the rest)")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {axes}: at most one axis may have size -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if devices.size % known:
        raise ValueError(f"mesh {axes} does not divide {devices.size} devices")
    sizes = [devices.size // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != devices.size:
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, have {devices.size}")
    return Mesh(devices.reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _spec_for(shape, rule, mesh: Mesh) -> P:
    if rule == "replicate":
        return P()
    if rule == "fsdp":
        n = mesh.shape.get("fsdp", 1)
        dims = [d for d in np.argsort(shape)[::-1] if shape[d] % n == 0 and shape[d] >= n]
        if n == 1 or not dims:
            return P()
        spec = [None] * len(shape)
        spec[dims[0]] = "fsdp"
        return P(*spec)
    if isinstance(rule, str):
        raise ValueError(f"sharding rule {rule!r}: use 'replicate', 'fsdp' or a tuple of mesh axes / None per dimension")
    rule = tuple(rule)
    if len(rule) != len(shape):
        raise ValueError(f"sharding spec {rule} has {len(rule)} entries for a leaf of shape {shape}")
    unknown = [a for a in rule if a is not None and a not in mesh.axis_names]
    if unknown:
        raise ValueError(f"sharding spec {rule} names {unknown}, not axes of the mesh {tuple(mesh.axis_names)}")
    return P(*rule)


# An "fsdp" leaf of at least this many elements that no dimension lets split is named in a warning: on
# every device whole, it may not fit where the config meant it to be split.
LARGE_LEAF = 1 << 20


def tree_shardings(tree, mesh: Mesh, rules) -> object:
    """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs) from the first matching rule."""
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]
    whole = []  # large "fsdp" leaves that stay whole

    def leaf_sharding(path, leaf):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        shape = tuple(getattr(leaf, "shape", ()))
        for pattern, spec in compiled:
            if pattern.fullmatch(name):
                pspec = _spec_for(shape, spec, mesh) if shape else P()
                if spec == "fsdp" and mesh.shape.get("fsdp", 1) > 1 and pspec == P() and np.prod(shape) >= LARGE_LEAF:
                    whole.append(f"{name} {shape}")
                return NamedSharding(mesh, pspec)
        return NamedSharding(mesh, P())

    shardings = jax.tree_util.tree_map_with_path(leaf_sharding, tree)
    if whole:
        warnings.warn(f"sharding: {len(whole)} large leaves that an 'fsdp' rule matches have no dimension "
                      f"divisible by fsdp={mesh.shape['fsdp']} and stay whole on every device: "
                      f"{', '.join(whole[:4])}{' ...' if len(whole) > 4 else ''}", stacklevel=2)
    return shardings
