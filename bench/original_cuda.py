"""The original's training steps on a CUDA GPU, for a ratio beside `bench.run` on the same machine:
`TAMING_SRC=DIR python -m bench.original_cuda --workload gpt_train_step [--repeats N] [--no-tf32]`.

The shared `bench_original.py` times the original on CPU threads only. This runs its workloads' training
steps with the model and the batch on the GPU, through that script's own builders: the original's modules
from $TAMING_SRC, its stand-ins for torchvision and Lightning, its Lightning-style two-optimiser VQGAN
step, its learning rates. `bench_original.py` is found as `workloads.json` is (beside the checkout or in
it), or at $BENCH_ORIGINAL. Each step ends by reading its loss on the host, which waits for the GPU, so a
step's time is the GPU's. TF32 is on by default for matmuls and convolutions, as XLA uses it for float32
on such GPUs: the same arithmetic on both sides (for full float32 on both, --no-tf32 here and
JAX_DEFAULT_MATMUL_PRECISION=highest for bench.run). One JSON line, fields as bench.run's.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

from bench.run import HERE, load_workloads, peak_rss_mb, workloads_path

ORIGINAL_PATHS = tuple(os.path.join(os.path.dirname(p), "bench_original.py") for p in (
    os.path.join(HERE, "..", "..", "shared", "bench", "workloads.json"),
    os.path.join(HERE, "..", "shared", "bench", "workloads.json")))


def load_bench_original():
    """The shared bench_original.py as a module, with the original's `taming` importable."""
    candidates = [os.environ["BENCH_ORIGINAL"]] if os.environ.get("BENCH_ORIGINAL") else ORIGINAL_PATHS
    path = next((os.path.normpath(p) for p in candidates if os.path.exists(p)), None)
    if path is None:
        raise FileNotFoundError(f"bench_original.py not found (looked at {list(candidates)}); set BENCH_ORIGINAL")
    spec = importlib.util.spec_from_file_location("bench_original", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.import_taming()  # exits naming $TAMING_SRC when it does not hold taming/
    return module


def time_steps(step, repeats: int):
    """step() -> loss on the host; -> (first call's seconds, [seconds of each timed call], last loss)."""
    t0 = time.perf_counter()
    loss = step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return first, times, loss


def gpt_train_step(original, spec: dict, device: str, repeats: int) -> dict:
    """The GPT's forward with targets, backward and AdamW (Net2NetTransformer.configure_optimizers)."""
    import torch
    from taming.models.cond_transformer import Net2NetTransformer

    b, t, vocab = spec["batch"], spec["seq_len"], spec["model"]["vocab_size"]
    torch.manual_seed(0)
    gpt = original.gpt_from(spec["model"]).to(device).train()
    opt = Net2NetTransformer.configure_optimizers(original.net2net_view(gpt, learning_rate=b * original.BASE_LR))
    tokens, targets = torch.randint(0, vocab, (2, b, t), device=device).unbind(0)

    def step():
        _, loss = gpt(tokens, targets=targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    first, times, loss = time_steps(step, repeats)
    med = statistics.median(times)
    return dict(tokens_per_s=b * t / med, step_ms=med * 1e3, compile_s=first, last_loss=loss,
                step_ms_all=[round(x * 1e3, 2) for x in times], batch=b, seq_len=t)


def vqgan_train_step(original, spec: dict, device: str, repeats: int) -> dict:
    """Both Lightning-style updates (autoencoder, then discriminator), discriminator active."""
    import torch

    b, (h, w, c) = spec["batch"], spec["image"]
    torch.manual_seed(0)
    model = original.build_vqmodel(spec, disc_start=0).to(device)
    model.learning_rate = b * original.BASE_LR
    optimizers, _ = model.configure_optimizers()
    model.train()
    batch = {"image": torch.rand(b, h, w, c, device=device) * 2 - 1}
    lightning_step = original.lightning_step_fn(model, optimizers)
    calls = iter(range(1 << 30))

    first, times, losses = time_steps(lambda: lightning_step(batch, next(calls)), repeats)
    med = statistics.median(times)
    return dict(images_per_s=b / med, step_ms=med * 1e3, compile_s=first,
                last_losses={"ae": losses[0], "disc": losses[1]},
                step_ms_all=[round(x * 1e3, 2) for x in times], batch=b)


BENCHMARKS = {"gpt_train_step": gpt_train_step, "vqgan_train_step": vqgan_train_step}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(BENCHMARKS), required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda", help="a torch device (cpu: to try this harness without a GPU)")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="full float32 matmuls")
    parser.add_argument("--workloads-json", default=None)
    args = parser.parse_args(argv)
    path = workloads_path(args.workloads_json)
    original = load_bench_original()

    import torch

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = True  # what a tuned PyTorch run sets: the fastest convolution kernels
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device for torch: pass --device cpu, or use the shared bench_original.py")
    record = BENCHMARKS[args.workload](original, load_workloads(path)[args.workload], args.device, args.repeats)
    print(json.dumps(dict(workload=args.workload, impl="taming-original-pytorch", torch=torch.__version__,
                          device=torch.cuda.get_device_name(args.device) if cuda else "cpu",
                          tf32=args.tf32 if cuda else None, repeats=args.repeats, **record,
                          peak_rss_mb=peak_rss_mb(), workloads_file=os.path.abspath(path))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
