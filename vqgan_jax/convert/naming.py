"""The one rule that maps our parameter paths to the original's `state_dict` keys, and array layouts.

Our modules are named after the original's: a PyTorch list item `down.0` is the Flax module `down_0`, and
`mid.block_1` keeps its name. Leaves: `kernel`/`scale`/`embedding` are PyTorch's `weight`, BatchNorm's
`mean`/`var` its `running_mean`/`running_var`. Kernels change layout: conv HWIO <-> OIHW, dense
(in, out) <-> (out, in). Both directions use this one mapping, so import and export cannot drift apart.
"""

import re
from typing import Mapping

import jax
import numpy as np

_LIST_ITEM = re.compile(r"(down|up|block|attn|blocks|main|mlp)_(\d+)")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias",
         "mean": "running_mean", "var": "running_var", "pos_emb": "pos_emb"}


def torch_key(path: tuple[str, ...]) -> str:
    """('encoder', 'down_0', 'block_1', 'conv1', 'kernel') -> 'encoder.down.0.block.1.conv1.weight'."""
    parts = []
    for i, name in enumerate(path[:-1]):
        match = _LIST_ITEM.fullmatch(name)
        # Children of `mid` are plain attributes in the original (`mid.block_1`), not list items.
        if match and (i == 0 or path[i - 1] != "mid"):
            parts += [match[1], match[2]]
        else:
            parts.append(name)
    if path[-1] not in _LEAF:
        raise KeyError(f"no PyTorch name for parameter {'/'.join(path)}")
    return ".".join(parts + [_LEAF[path[-1]]])


def _kernel_perm(ndim: int) -> tuple[int, ...] | None:
    return {4: (3, 2, 0, 1), 2: (1, 0)}.get(ndim)


def to_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    perm = _kernel_perm(array.ndim) if leaf == "kernel" else None
    return np.ascontiguousarray(np.transpose(array, perm)) if perm else array


def from_torch_layout(leaf: str, array: np.ndarray) -> np.ndarray:
    perm = _kernel_perm(array.ndim) if leaf == "kernel" else None
    return np.transpose(array, np.argsort(perm)) if perm else array


def torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    perm = _kernel_perm(len(shape)) if leaf == "kernel" else None
    return tuple(shape[p] for p in perm) if perm else tuple(shape)


def _flatten(tree) -> list[tuple[tuple[str, ...], object]]:
    return [(tuple(k.key for k in path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _unflatten(items: dict[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, value in items.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def import_variables(state: Mapping[str, np.ndarray], expected: Mapping[str, object],
                     ignored: Mapping[str, object] | None = None, what: str = "model") -> dict:
    """Fills `expected` ({collection: tree of arrays or ShapeDtypeStructs}) from a PyTorch `state`.

    Every parameter must be present with the right shape and every key used, except those in `ignored`
    (key -> a check that raises for a bad value, or None); all problems are reported together.
    """
    ignored = ignored or {}
    out, used, problems = {}, set(), []
    for collection, tree in expected.items():
        items = {}
        for path, spec in _flatten(tree):
            key = torch_key(path)
            want = torch_shape(path[-1], tuple(spec.shape))
            if key not in state:
                problems.append(f"missing key {key!r} (expected shape {want})")
                continue
            used.add(key)
            array = np.asarray(state[key])
            if tuple(array.shape) != want:
                problems.append(f"key {key!r} has shape {tuple(array.shape)}, the model expects {want}")
                continue
            items[path] = from_torch_layout(path[-1], array).astype(spec.dtype)
        out[collection] = _unflatten(items)
    for key in sorted(set(state) - used):
        if key in ignored:
            if ignored[key] is not None:
                ignored[key](np.asarray(state[key]))
        else:
            problems.append(f"unexpected key {key!r} with shape {tuple(np.shape(state[key]))}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ValueError(f"checkpoint does not fit the {what}:\n  {shown}")
    return out


def export_variables(variables: Mapping[str, object], prefix: str = "") -> dict[str, np.ndarray]:
    """{collection: tree} -> {prefix + PyTorch key: array in PyTorch layout}."""
    state = {}
    for tree in variables.values():
        for path, value in _flatten(tree):
            state[prefix + torch_key(path)] = to_torch_layout(path[-1], np.asarray(value))
    return state
