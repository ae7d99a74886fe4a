"""`import vqgan_jax` turns XLA:CPU's YNNPACK off (vqgan_jax/xla_flags.py), and only when it may."""

import os
import subprocess
import sys

import pytest

from vqgan_jax import xla_flags

FLAG = "--xla_cpu_experimental_ynn_fusion_type="


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backend_started", lambda: False)
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10))
    monkeypatch.setattr(xla_flags, "_applied_by_us", False)


def test_appends_to_the_users_flags(fresh):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    assert xla_flags.apply_cpu_defaults(env)
    assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4", FLAG]
    env = {}
    assert xla_flags.apply_cpu_defaults(env) and env["XLA_FLAGS"] == FLAG


@pytest.mark.parametrize("env", [
    {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"},  # the user's own choice
    {"VQGAN_JAX_KEEP_XLA_FLAGS": "1"},                                       # opt out
])
def test_leaves_flags_alone_when_told(fresh, env):
    before = dict(env)
    assert not xla_flags.apply_cpu_defaults(env)
    assert env == before


@pytest.mark.parametrize("env", [
    {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"},
    {"VQGAN_JAX_KEEP_XLA_FLAGS": "1"},
])
def test_decoding_programs_take_ynnpack_dots_unless_told(fresh, env):
    assert xla_flags.decode_compiler_options({}) == {FLAG.strip("-="): "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    assert xla_flags.decode_compiler_options(env) == {}


def test_decoding_programs_take_ynnpack_dots_after_our_own_default(fresh):
    """The flag that apply_cpu_defaults wrote is not the user's choice: decoding still gets YNNPACK dots."""
    env = {}
    assert xla_flags.apply_cpu_defaults(env)
    assert xla_flags.decode_compiler_options(env) == {FLAG.strip("-="): "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def test_leaves_older_jaxlib_alone(fresh, monkeypatch):
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 9))
    env = {}
    assert not xla_flags.apply_cpu_defaults(env) and env == {}


def test_warns_when_jax_already_started(monkeypatch):
    monkeypatch.setattr(xla_flags, "_backend_started", lambda: True)
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10))
    env = {}
    with pytest.warns(UserWarning, match="imported after JAX started its backend"):
        assert not xla_flags.apply_cpu_defaults(env)
    assert env == {}


@pytest.mark.skipif(xla_flags._jaxlib_version() < xla_flags._MIN_JAXLIB, reason="jaxlib without YNNPACK")
@pytest.mark.parametrize("opt_out", [False, True])
def test_import_keeps_convolutions_out_of_ynnpack(opt_out):
    """End to end in a fresh process: after `import vqgan_jax` a convolution compiles to XLA's own kernel
    and a decoding program's weight product to YNNPACK; with the opt-out, both to YNNPACK's default (so
    the check can tell the two apart)."""
    code = ("import vqgan_jax, jax, jax.numpy as jnp\n"
            "x, w = jnp.ones((4, 32, 32, 64)), jnp.ones((3, 3, 64, 64))\n"  # YNNPACK takes convs this size
            "f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', "
            "dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
            "print('ynn' in jax.jit(f).lower(x, w).compile().as_text().lower())\n"
            "opts = vqgan_jax.xla_flags.decode_compiler_options()\n"  # what the samplers compile with
            "m, v = jnp.ones((1024, 512)), jnp.ones((512, 8))\n"
            "print('ynn' in jax.jit(jnp.dot, compiler_options=opts).lower(m, v).compile().as_text().lower())\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", xla_flags.OPT_OUT)}
    if opt_out:
        env[xla_flags.OPT_OUT] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    conv_in_ynn, decode_dot_in_ynn = out.stdout.split()[-2:]
    assert conv_in_ynn == str(opt_out)
    assert decode_dot_in_ynn == "True"
