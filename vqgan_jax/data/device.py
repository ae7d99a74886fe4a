"""Host batches -> global jax.Arrays, a few steps ahead of the training loop."""

import queue
import threading

import numpy as np

_END = object()


class _Failure:
    def __init__(self, error):
        self.error = error


# The with_keys=True fields: which file each row came from, for checking order and sharding on the host.
HOST_KEYS = ("key", "index")


def _is_numeric(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind in "biuf"


def to_global(batch, sharding):
    """Host-local numpy batch (pytree) -> global jax.Arrays laid out by `sharding`.

    sharding: one jax.sharding.Sharding for every leaf, or a pytree of them matching `batch`. Each host
    passes its own rows; the global batch is their concatenation over processes. A dict's HOST_KEYS
    ("key", "index" of with_keys=True) and non-numeric leaves stay on the host unchanged.
    """
    import jax

    def put(x, s):
        return jax.make_array_from_process_local_data(s, x) if _is_numeric(x) else x

    host = {}
    if isinstance(batch, dict) and any(k in batch for k in HOST_KEYS):
        host = {k: batch[k] for k in HOST_KEYS if k in batch}
        batch = {k: v for k, v in batch.items() if k not in HOST_KEYS}
        if isinstance(sharding, dict):
            sharding = {k: v for k, v in sharding.items() if k not in HOST_KEYS}
    if isinstance(sharding, jax.sharding.Sharding):
        out = jax.tree.map(lambda x: put(x, sharding), batch)
    else:
        out = jax.tree.map(put, batch, sharding)
    return {**out, **host} if host else out


def _put(q, stop, item) -> bool:
    # Poll so that a producer blocked on a full queue notices close().
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(iterator, sharding, q, stop):
    # A plain function, not a method: the thread must not keep the DevicePrefetcher alive, so that
    # dropping it (e.g. leaving an eval loop early) lets __del__ stop the thread and free its batches.
    try:
        for batch in iterator:
            if not _put(q, stop, to_global(batch, sharding)):
                return
    except BaseException as e:  # handed to the consumer, which re-raises it
        _put(q, stop, _Failure(e))
        return
    _put(q, stop, _END)


class DevicePrefetcher:
    """Iterator over `to_global(batch, sharding)` for each batch of `iterator`, `size` batches ahead.

    A daemon thread does the host-to-device copies. Errors raised by the source come out of `next()`;
    a finite source ends the iteration. Attributes not found here (e.g. `skipped`, `stats`, `step`) are
    read from the wrapped iterator; they already count the batches in flight.
    """

    def __init__(self, iterator, sharding, size=2):
        self.iterator = iterator
        self.sharding = sharding
        self._queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=_produce, args=(iterator, sharding, self._queue, self._stop),
                                        name="prefetch_to_device", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # later next() calls end too
            raise StopIteration
        if isinstance(item, _Failure):
            self._queue.put(item)
            raise item.error
        return item

    def close(self, timeout: float = 60.0):
        """Stops the producer thread (after the batch it may be converting), waits for it and drops the
        batches in flight.

        Call it when done (the training loops do): a thread still holding device arrays when the
        interpreter exits frees them while Python is shutting down, which aborts the process ("FATAL:
        exception not rethrown") after all the work is done."""
        self._stop.set()
        self._thread.join(timeout)
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break

    def __getattr__(self, name):
        if name.startswith("_") or name == "iterator":  # private, or not yet set (during __init__)
            raise AttributeError(name)
        return getattr(self.iterator, name)

    def __del__(self):
        # Not close(): during interpreter shutdown a join could wait forever on a thread Python no longer runs.
        stop = self.__dict__.get("_stop")
        if stop is not None:
            stop.set()


def prefetch_to_device(iterator, sharding, size=2):
    """Wraps an iterator of host-local numpy batch dicts: yields global jax.Array batches, `size` ahead.

    Each leaf x becomes jax.make_array_from_process_local_data(sharding, x): pass e.g.
    NamedSharding(mesh, PartitionSpec("data")) to split the batch dimension over the mesh's data axis.
    size <= 0 converts in the caller's thread, with nothing in flight.
    """
    if size <= 0:
        return (to_global(batch, sharding) for batch in iterator)
    return DevicePrefetcher(iterator, sharding, size)
