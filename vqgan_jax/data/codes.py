"""Code caches: a dataset encoded once by the first stage (and the conditioning stage), read by
transformer training instead of images.

A cache is a directory:
  meta.json                 code grid shape [h, w], condition length n, vocabulary sizes, provenance
  codes-<host>-<shard>.npy  [N_shard, h, w] uint16 (int32 for vocabularies over 65535)
  cond-<host>-<shard>.npy   [N_shard, n], same dtype rule
Shards are memory-mapped, so a cache larger than memory is fine. `python -m vqgan_jax.data.encode` writes it.

Training order, like the image pipeline's, is a pure function of (seed, step): the global batch at step
k holds examples perm_e[(k * B + r) mod N] for rows r, with perm_e a permutation drawn from (seed, epoch
e), and each host takes its own rows of that batch. Resuming at step k costs nothing.
"""

import glob
import json
import os

import numpy as np

from vqgan_jax.data.config import local_batch_size

META = "meta.json"


def code_dtype(vocab: int):
    return np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32


class CodeCache:
    """All shards of a cache directory, indexable by global example number."""

    def __init__(self, directory: str):
        meta_path = os.path.join(directory, META)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"no code cache in {directory!r} (no {META}); write one with "
                                    f"`python -m vqgan_jax.data.encode --config ... --out {directory}`")
        with open(meta_path) as f:
            self.meta = json.load(f)
        code_files = sorted(glob.glob(os.path.join(directory, "codes-*.npy")))
        if not code_files:
            raise FileNotFoundError(f"code cache {directory!r} has {META} but no codes-*.npy shards")
        self._codes = [np.load(p, mmap_mode="r") for p in code_files]
        self._cond = []
        for p in code_files:
            cond_path = os.path.join(directory, "cond-" + os.path.basename(p)[len("codes-"):])
            if not os.path.exists(cond_path):
                raise FileNotFoundError(f"code cache shard {p!r} has no matching {cond_path!r}")
            self._cond.append(np.load(cond_path, mmap_mode="r"))
        for c, n in zip(self._codes, self._cond):
            if len(c) != len(n):
                raise ValueError(f"code cache {directory!r}: a shard holds {len(c)} code grids but {len(n)} conditions")
        self._starts = np.cumsum([0] + [len(c) for c in self._codes])
        self.num_examples = int(self._starts[-1])
        if self.num_examples == 0:
            raise ValueError(f"code cache {directory!r} holds no examples")
        if self.num_examples != self.meta.get("num_examples", self.num_examples):
            raise ValueError(f"code cache {directory!r}: its shards hold {self.num_examples} examples, its {META} "
                             f"says {self.meta['num_examples']}; encode it again")

    def gather(self, indices) -> dict:
        """indices: int [n] global example numbers -> {"codes": int32 [n, h, w], "cond": int32 [n, k]}."""
        indices = np.asarray(indices)
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        codes = np.stack([self._codes[s][i - self._starts[s]] for s, i in zip(shard, indices)])
        cond = np.stack([self._cond[s][i - self._starts[s]] for s, i in zip(shard, indices)])
        return {"codes": codes.astype(np.int32), "cond": cond.astype(np.int32)}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class CodeBatches:
    """Infinite training batches from a cache: {"codes": int32 [B_local, h, w], "cond": int32 [B_local, n]}."""

    def __init__(self, cache: CodeCache, global_batch_size: int, seed: int, start_step: int,
                 process_index: int, process_count: int):
        local = local_batch_size(global_batch_size, process_count)
        self.cache, self.global_batch_size, self.seed = cache, global_batch_size, seed
        self.step = start_step
        self._rows = np.arange(process_index * local, (process_index + 1) * local)
        self._epoch, self._perm = -1, None
        self.skipped = 0  # the same attribute as the image pipeline's, for the loop's log

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        n = self.cache.num_examples
        positions = self.step * self.global_batch_size + self._rows
        indices = np.empty_like(positions)
        for epoch in np.unique(positions // n):
            if epoch != self._epoch:
                self._epoch, self._perm = int(epoch), _permutation(self.seed, int(epoch), n)
            here = positions // n == epoch
            indices[here] = self._perm[positions[here] % n]
        self.step += 1
        return self.cache.gather(indices)


def code_batches(directory: str, global_batch_size: int, seed: int = 0, start_step: int = 0, *,
                 process_index: int | None = None, process_count: int | None = None) -> CodeBatches:
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    return CodeBatches(CodeCache(directory), global_batch_size, seed, start_step, process_index, process_count)


def code_eval_batches(directory: str, batch_size: int, *, process_index: int | None = None,
                      process_count: int | None = None):
    """One pass in order; every host yields the same number of batches of batch_size // process_count
    rows, with "mask" False on padding rows."""
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local = local_batch_size(batch_size, process_count)
    cache = CodeCache(directory)
    for start in range(0, cache.num_examples, batch_size):
        positions = start + process_index * local + np.arange(local)
        mask = positions < cache.num_examples
        batch = cache.gather(np.where(mask, positions, 0))
        batch["mask"] = mask
        yield batch


class CodeWriter:
    """Appends encoded batches and writes shards of `shard_size` examples; `close()` flushes the rest."""

    def __init__(self, directory: str, vocab: int, process_index: int = 0, shard_size: int = 50_000):
        os.makedirs(directory, exist_ok=True)
        self.directory, self.dtype, self.process_index = directory, code_dtype(vocab), process_index
        self.shard_size, self._shard, self._codes, self._cond, self.count = shard_size, 0, [], [], 0

    def add(self, codes, cond) -> None:
        """codes: int [n, h, w]; cond: int [n, k]."""
        self._codes.append(np.asarray(codes).astype(self.dtype))
        self._cond.append(np.asarray(cond).astype(self.dtype))
        self.count += len(codes)
        if sum(len(c) for c in self._codes) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._codes:
            return
        name = f"{self.process_index:03d}-{self._shard:05d}.npy"
        # Written under a temporary name and renamed, so a killed run never leaves a truncated shard.
        for prefix, parts in (("codes", self._codes), ("cond", self._cond)):
            tmp = os.path.join(self.directory, f".{prefix}-{name}")
            np.save(tmp, np.concatenate(parts))
            os.replace(tmp, os.path.join(self.directory, f"{prefix}-{name}"))
        self._shard += 1
        self._codes, self._cond = [], []

    def close(self) -> None:
        self._flush()
