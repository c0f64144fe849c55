"""CLIP train-step throughput and MFU, and forward time against Hugging Face's PyTorch CLIP.

    python benchmarks/clip_step.py --models tiny:128,ViT-B-32:8 --compare_hf tiny:128,ViT-B-32:8 \
        --out benchmarks/results/clip_step_cpu

For every `model:batch` it compiles the real train step (AdamW, global-batch contrastive
loss), reads FLOPs from XLA's cost analysis of the compiled step and the memory footprint
from its memory analysis, times `--steps` steps, and reports step time, samples/s, achieved
TFLOP/s and MFU (FLOPs / time / peak of the device kind; `--peak_tflops` overrides, and on
CPU, which has no published peak, the peak is measured with a large matmul and named so).
`--compare_hf` times encode_image + encode_text against `transformers.CLIPModel` on the same
random weights and inputs (torch limited to the same number of threads as cores here).
Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fomo_jax import models, runtime, sharding  # noqa: E402
from fomo_jax import params as params_lib  # noqa: E402
from fomo_jax.continual.loop import finetuning  # noqa: E402
from fomo_jax.models import clip  # noqa: E402
from fomo_jax.train import optimizer  # noqa: E402

# Dense peak FLOP/s per chip by device kind and compute dtype (vendor datasheets; float32 on
# NVIDIA runs as TF32 on tensor cores under XLA's default precision).
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.0, "float32": 494.5},
    "NVIDIA H200": {"bfloat16": 989.0, "float32": 494.5},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32": 156.0},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312.0, "float32": 156.0},
    "TPU v4": {"bfloat16": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0},
    "TPU v5": {"bfloat16": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0},
}


def parse_pairs(text: str) -> list[tuple[str, int]]:
    pairs = []
    for item in filter(None, text.split(",")):
        name, _, batch = item.partition(":")
        pairs.append((name, int(batch or 8)))
    return pairs


def median_time(fn, repeats: int, min_seconds: float = 1.0) -> float:
    """Median wall time of `fn` over at least `repeats` calls and `min_seconds` in total."""
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measured_matmul_peak(dtype) -> float:
    """TFLOP/s of a large square matmul: the practical ceiling where no datasheet peak exists."""
    n = 2048
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    seconds = median_time(lambda: f(a).block_until_ready(), 5)
    return 2 * n**3 / seconds / 1e12


def analytic_train_flops(cfg: models.CLIPConfig, batch: int) -> float:
    """3x the forward matmul FLOPs (2 per multiply-add), attention included, embeddings not."""
    v, t = cfg.vision, cfg.text

    def tower(width, mlp, layers, tokens):
        per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens**2 * width
        return layers * per_layer

    image_tokens = (v.image_size // v.patch_size) ** 2 + 1
    forward = (
        tower(v.width, v.mlp_dim, v.layers, image_tokens)
        + 2 * (image_tokens - 1) * v.patch_size**2 * 3 * v.width
        + tower(t.width, t.mlp_dim, t.layers, t.context_length)
        + 2 * (v.width + t.width) * cfg.embed_dim
    )
    return 3.0 * forward * batch


def inputs(cfg, batch, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, cfg.vision.image_size, cfg.vision.image_size, 3))
    ids = rng.integers(1, cfg.text.vocab_size - 2, (batch, cfg.text.context_length))
    ids[:, 0] = cfg.text.vocab_size - 2
    length = min(20, cfg.text.context_length)  # typical caption: ~20 tokens
    ids[:, length - 1] = cfg.text.vocab_size - 1
    ids[:, length:] = 0
    return pixels.astype(np.float32), ids.astype(np.int32)


def measure_step(step, state, data, repeats: int):
    """(compile seconds, XLA-counted FLOPs, compiled memory in bytes or None, median step
    seconds after a warm-up) of a jitted (state, batch, lr) train step that donates its state."""
    start = time.perf_counter()
    compiled = step.lower(state, data, 1e-4).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    memory = compiled.memory_analysis()
    footprint = None
    if memory is not None:
        footprint = (
            memory.temp_size_in_bytes
            + memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
        )
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], data, 1e-4)
        jax.block_until_ready(metrics["loss"])

    one_step()  # warm-up
    return compile_seconds, flops, footprint, median_time(one_step, repeats)


def bench_step(name, batch, dtype, steps, peak, attention=None):
    cfg = models.get_config(name, dtype=dtype, attention_implementation=attention)
    model = models.create_model(cfg)
    graphdef, params = params_lib.split(model)
    tx = optimizer.adamw()
    mesh = sharding.make_mesh()
    step, state = finetuning(graphdef, tx, mesh, params)
    pixels, ids = inputs(cfg, batch)
    data = {"pixels": pixels, "token_ids": ids}
    compile_seconds, flops, footprint, seconds = measure_step(step, state, data, steps)
    achieved = flops / seconds / 1e12
    return {
        "model": name,
        "batch": batch,
        "dtype": dtype,
        "attention": attention or "auto",
        "params_millions": optimizer.trainable_count(params) / 1e6,
        "compile_seconds": compile_seconds,
        "step_seconds": seconds,
        "samples_per_second": batch / seconds,
        "xla_flops_per_step": flops,
        "analytic_flops_per_step": analytic_train_flops(cfg, batch),
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "compiled_memory_gib": footprint / 2**30 if footprint is not None else None,
    }


def bench_vs_hf(name, batch, repeats):
    import torch
    from transformers import CLIPModel

    torch.set_num_threads(os.cpu_count())
    model = models.create_model(name)
    cfg = model.config
    with tempfile.TemporaryDirectory() as tmp:  # the same weights on both sides
        models.export_hf(model, tmp)
        hf = CLIPModel.from_pretrained(tmp).eval()
    pixels, ids = inputs(cfg, batch)
    torch_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    torch_ids = torch.from_numpy(ids.astype(np.int64))

    def ours():
        jax.block_until_ready((model.encode_image(pixels), model.encode_text(ids)))

    full_text = clip._encoder(model, "text")  # the jitted tower without padding trimming

    def ours_full_context():  # no padding trimming: the same work as HF does
        jax.block_until_ready((model.encode_image(pixels), full_text(ids)))

    def theirs():
        with torch.inference_mode():
            hf.get_image_features(pixel_values=torch_pixels)
            hf.get_text_features(input_ids=torch_ids)

    for fn in (ours, ours_full_context, theirs):
        fn()
    t_ours, t_full, t_hf = (median_time(f, repeats) for f in (ours, ours_full_context, theirs))
    with torch.inference_mode():
        want = hf.get_image_features(pixel_values=torch_pixels)
    want = getattr(want, "pooler_output", want).numpy()
    max_diff = float(np.abs(np.asarray(model.encode_image(pixels)) - want).max())
    return {
        "model": name,
        "batch": batch,
        "torch_threads": torch.get_num_threads(),
        "fomo_jax_seconds": t_ours,
        "fomo_jax_full_context_seconds": t_full,
        "hf_torch_seconds": t_hf,
        "ratio": t_ours / t_hf,
        "ratio_full_context": t_full / t_hf,
        "image_embedding_max_abs_diff": max_diff,
    }


def hardware():
    device = jax.devices()[0]
    cpu = platform.processor() or "unknown"
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Model name")), cpu
        )
    except OSError:
        pass
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
    }


def write_report(out: str, report: dict, table: str) -> None:
    """`<out>.json` (every number) and `<out>.md` (the table), and the table on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(table)
    print(table)


def markdown(report) -> str:
    hw = report["hardware"]
    lines = [
        f"# CLIP train step ({report['date']})",
        "",
        f"Hardware: {hw['device_count']} x {hw['device_kind']} ({hw['platform']}), "
        f"CPU {hw['cpu']} x {hw['cpu_count']} cores, jax {hw['jax']}.  ",
        f"Command: `{report['command']}`",
        "",
        "| model | batch | dtype | attention | params (M) | step (s) | samples/s | "
        "XLA TFLOP/step | XLA/analytic | TFLOP/s | peak TFLOP/s | MFU | memory (GiB) | "
        "compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["train_step"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['compiled_memory_gib']:.2f}" if r["compiled_memory_gib"] is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['dtype']} | {r.get('attention', 'auto')} | "
            f"{r['params_millions']:.1f} | "
            f"{r['step_seconds']:.3f} | {r['samples_per_second']:.1f} | "
            f"{r['xla_flops_per_step'] / 1e12:.3f} | "
            f"{r['xla_flops_per_step'] / r['analytic_flops_per_step']:.2f} | "
            f"{r['achieved_tflops']:.3f} | {r['peak_tflops']:.3g} | {mfu} | {mem} | "
            f"{r['compile_seconds']:.1f} |"
        )
    lines += ["", f"Peak: {report['peak_source']}.", ""]
    if report["vs_hf"]:
        lines += [
            "## Forward (encode_image + encode_text) vs Hugging Face PyTorch CLIP",
            "",
            "Same random weights and inputs (captions of 20 tokens in a 77-token "
            "context), float32.",
            "",
            "| model | batch | torch threads | fomo_jax (s) | fomo_jax, full 77-token "
            "text (s) | HF torch (s) | ratio | ratio, full text | max abs diff |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in report["vs_hf"]:
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['torch_threads']} | "
                f"{r['fomo_jax_seconds']:.4f} | {r['fomo_jax_full_context_seconds']:.4f} | "
                f"{r['hf_torch_seconds']:.4f} | {r['ratio']:.2f} | "
                f"{r['ratio_full_context']:.2f} | {r['image_embedding_max_abs_diff']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default="tiny:128,ViT-B-32:8",
        help="comma-separated model:batch pairs for the train step",
    )
    parser.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on GPUs)")
    parser.add_argument(
        "--attention",
        default="auto",
        help="comma-separated attention backends of the train step: auto (the dispatcher's "
        "choice), xla, cudnn, pallas; every model:batch runs under each",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="peak TFLOP/s per device (default: table, or measured on CPU)",
    )
    parser.add_argument("--compare_hf", default="", help="model:batch pairs to time against HF")
    parser.add_argument("--out", default="benchmarks/results/clip_step")
    args = parser.parse_args()
    runtime.enable_compilation_cache()

    device = jax.devices()[0]
    if args.peak_tflops:
        peak, source = args.peak_tflops, "given with --peak_tflops"
    elif args.dtype in PEAK_TFLOPS.get(device.device_kind, {}):
        peak, source = PEAK_TFLOPS[device.device_kind][args.dtype], "datasheet dense peak"
    else:
        peak = measured_matmul_peak(jnp.dtype(args.dtype))
        source = (
            f"no datasheet peak for {device.device_kind}; measured {peak:.3f} TFLOP/s "
            f"with a 2048^3 {args.dtype} matmul, so MFU here is the fraction of "
            "achievable matmul throughput"
        )
    report = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "hardware": hardware(),
        "peak_source": source,
        "train_step": [
            bench_step(n, b, args.dtype, args.steps, peak, None if a == "auto" else a)
            for n, b in parse_pairs(args.models)
            for a in args.attention.split(",")
        ],
        "vs_hf": [bench_vs_hf(n, b, max(args.steps, 5)) for n, b in parse_pairs(args.compare_hf)],
    }
    write_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
