"""XLA:CPU options the project is measured with, set in `XLA_FLAGS` before JAX starts its backend.

Since jaxlib 0.10, XLA:CPU hands convolutions, matmuls and some reductions to YNNPACK. On the 2-core
x86 machines this project is tested and benchmarked on, YNNPACK's convolutions are 2-2.5x slower than
XLA's own (Eigen) kernels in the backward pass and its matmuls with 8 rows are slower too: the VQGAN
training step takes 4.05 s with it and 2.75 s without, the KV-cached sampler 180 against 240 tokens/s.
`vqgan_jax` therefore turns YNNPACK off at import, unless:

- `XLA_FLAGS` already names `--xla_cpu_experimental_ynn_fusion_type` (the user's choice wins), or
- `VQGAN_JAX_KEEP_XLA_FLAGS` is set (opt out), or
- jaxlib is older than 0.10 (not measured; an XLA that does not know a flag refuses to start), or
- JAX's backend is already running (then flags no longer apply; a warning says so).

The flag only concerns XLA:CPU: GPU and TPU programs are unchanged.
"""

import os
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
OPT_OUT = "VQGAN_JAX_KEEP_XLA_FLAGS"
_MIN_JAXLIB = (0, 10)


def _jaxlib_version() -> tuple[int, ...]:
    from jaxlib import version

    return tuple(int(p) for p in version.__version__.split(".")[:2] if p.isdigit())


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this helper: assume not started
        return False


def apply_cpu_defaults(environ=os.environ) -> bool:
    """Appends `--xla_cpu_experimental_ynn_fusion_type=` (YNNPACK off) to environ["XLA_FLAGS"] under the
    conditions in the module docstring; -> whether it did."""
    flags = environ.get("XLA_FLAGS", "")
    if YNN_FLAG.lstrip("-") in flags or environ.get(OPT_OUT) or _jaxlib_version() < _MIN_JAXLIB:
        return False
    if _backend_started():
        warnings.warn(f"vqgan_jax was imported after JAX started its backend, so XLA:CPU keeps YNNPACK "
                      f"(slower here; see vqgan_jax/xla_flags.py): import vqgan_jax first, or set "
                      f"XLA_FLAGS={YNN_FLAG}= yourself", stacklevel=3)
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
    return True
