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

The samplers' decoding programs are the exception: there every matmul is a weight matrix times a few
columns (the batch, feature-major; see sampling/step.py), where YNNPACK's kernel beats Eigen's (a
gpt_sample step 20.5 -> 18.0 ms, measured in one process). `decode_compiler_options()` gives those
programs YNNPACK for dots alone, per jit, under the same conditions; the flag that `apply_cpu_defaults`
wrote itself does not count as the user's choice.
"""

import os
import warnings

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
OPT_OUT = "VQGAN_JAX_KEEP_XLA_FLAGS"
_MIN_JAXLIB = (0, 10)
_applied_by_us = False  # the YNNPACK flag now in XLA_FLAGS is ours, not the user's choice


def _jaxlib_version() -> tuple[int, ...]:
    from jaxlib import version

    return tuple(int(p) for p in version.__version__.split(".")[:2] if p.isdigit())


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # a JAX without this helper: assume not started
        return False


def _user_chose(environ) -> bool:
    return YNN_FLAG.lstrip("-") in environ.get("XLA_FLAGS", "") or bool(environ.get(OPT_OUT))


def decode_compiler_options(environ=os.environ) -> dict:
    """`compiler_options` for a decoding program's jit: YNNPACK for dots only (an XLA:CPU option), or {}
    when the user chose YNNPACK's setting or opted out, or jaxlib < 0.10."""
    if (_user_chose(environ) and not _applied_by_us) or _jaxlib_version() < _MIN_JAXLIB:
        return {}
    return {YNN_FLAG.lstrip("-"): "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def apply_cpu_defaults(environ=os.environ) -> bool:
    """Appends `--xla_cpu_experimental_ynn_fusion_type=` (YNNPACK off) to environ["XLA_FLAGS"] under the
    conditions in the module docstring; -> whether it did."""
    flags = environ.get("XLA_FLAGS", "")
    if _user_chose(environ) or _jaxlib_version() < _MIN_JAXLIB:
        return False
    if _backend_started():
        warnings.warn(f"vqgan_jax was imported after JAX started its backend, so XLA:CPU keeps YNNPACK "
                      f"(slower here; see vqgan_jax/xla_flags.py): import vqgan_jax first, or set "
                      f"XLA_FLAGS={YNN_FLAG}= yourself", stacklevel=3)
        return False
    global _applied_by_us
    environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}=".strip()
    _applied_by_us = True
    return True
