"""Prefill and KV-cached greedy decoding throughput of a tiny LLaVA and of its LM alone.

    python benchmarks/vlm_step.py --out benchmarks/results/vlm_step_cpu

For every model (`--models`: `lm`, `llava`) and `batch:prompt_length` it times, after a warm-up
call and with `block_until_ready`, the jitted prefill (`generate.prefill`: the prompt through the
model into a KV cache; for LLaVA one image per row, its visual tokens part of the prompt length,
and the image tower included) and the jitted greedy generation (`generate.greedy_generate`, no
stop token, so every row decodes every step) of 1 and of `--new_tokens` tokens. It reports
prefill tokens/s (batch x prompt length / prefill time), the decode step ((generation of N -
generation of 1) / (N - 1): the `while_loop`'s steps alone, since generating one token is the
prefill and an argmax), decode tokens/s (batch / step time) and end-to-end generated tokens/s.
Writes `<out>.json` and `<out>.md`.

`--mode train` times the VLM's jitted train step instead (the one step of every job: the VLM
family's next-token loss, AdamW, every parameter trained) for each connector (`--connectors`)
and `batch:sequence_length` (`--train_shapes`; pairs of one image and a caption filling the
rest): tokens/s, XLA-counted FLOPs, achieved TFLOP/s, MFU (against the datasheet peak of the
device kind, or on a CPU the throughput of a measured 2048^3 matmul) and compiled memory.

    python benchmarks/vlm_step.py --mode train --out benchmarks/results/vlm_train_step_cpu
    # GPU: --dtype bfloat16 --lm_size small --train_shapes 16:1024 --out ..._gpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.clip_step import PEAK_TFLOPS, measure_step, measured_matmul_peak  # noqa: E402
from fomo_jax import params as params_lib  # noqa: E402
from fomo_jax import runtime  # noqa: E402
from fomo_jax.models import generate  # noqa: E402
from fomo_jax.models.llama import LlamaConfig, create_lm  # noqa: E402
from fomo_jax.models.variants import get_config  # noqa: E402
from fomo_jax.models.vlm import VLMConfig, create_vlm  # noqa: E402

# Decoder sizes. `tiny`: a toy-experiment LM (word-level vocabulary of a synthetic world);
# `small`: SmolLM-135M's width and vocabulary at 8 layers, for machines with more time.
LM_SIZES = {
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32,
    ),
    "small": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
    ),
}  # fmt: skip
VISION = "small"  # CLIP image tower: 64 px, patch 8 -> 64 visual tokens per image


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split(":")) for item in filter(None, text.split(","))]


def median_times(fns, repeats: int, min_seconds: float = 1.0) -> list[float]:
    """Median wall time of each of `fns`, called in turn (so that load from other processes
    skews them alike) at least `repeats` times and for `min_seconds` in total."""
    times = [[] for _ in fns]
    while len(times[0]) < repeats or sum(map(sum, times)) < min_seconds:
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def build(kind: str, lm_size: str, dtype: str):
    lm_cfg = LM_SIZES[lm_size].replace(dtype=dtype)
    if kind == "lm":
        return create_lm(lm_cfg)
    cfg = VLMConfig(
        vision=get_config(VISION, dtype=dtype), lm=lm_cfg, image_token_id=lm_cfg.vocab_size - 1
    )
    return create_vlm(cfg)


def prompts(model, batch: int, length: int, seed: int = 0):
    """Unpadded prompts; LLaVA rows start with one image (its visual tokens count in `length`)."""
    rng = np.random.default_rng(seed)
    cfg = getattr(model.config, "lm", model.config)
    ids = rng.integers(1, cfg.vocab_size - 1, (batch, length)).astype(np.int32)
    if not hasattr(model.config, "image_token_id"):
        return ids, {}
    seq, size = model.config.image_seq_length, model.config.vision.vision.image_size
    if length <= seq:
        raise ValueError(f"prompt length {length} leaves no text after {seq} image tokens")
    ids[:, :seq] = model.config.image_token_id
    pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    return ids, {"images": pixels}


def bench(model, kind, batch, length, new_tokens, repeats):
    ids, images = prompts(model, batch, length)

    def run_prefill():
        cache_length = length + new_tokens
        jax.block_until_ready(generate.prefill(model, ids, cache_length=cache_length, **images))

    def run_generate(tokens):
        return lambda: jax.block_until_ready(
            generate.greedy_generate(model, ids, max_new_tokens=tokens, **images)
        )

    # One new token is the prefill and an argmax (no loop step), so the difference to
    # `new_tokens` is the while_loop's new_tokens - 1 decode steps, prefill and image tower out.
    calls = [run_prefill, run_generate(1), run_generate(new_tokens)]
    for call in calls:  # compile (or load from the persistent cache) and warm up
        call()
    prefill_s, first_s, generate_s = median_times(calls, repeats)
    step_s = max(generate_s - first_s, 0.0) / (new_tokens - 1)
    _, params = params_lib.split(model)
    return {
        "model": kind,
        "params_millions": sum(x.size for x in jax.tree.leaves(params)) / 1e6,
        "batch": batch,
        "prompt_length": length,
        "new_tokens": new_tokens,
        "prefill_seconds": prefill_s,
        "prefill_tokens_per_second": batch * length / prefill_s,
        "generate_one_seconds": first_s,
        "generate_seconds": generate_s,
        "decode_step_seconds": step_s,
        "decode_tokens_per_second": batch / step_s if step_s else None,
        "generate_tokens_per_second": batch * new_tokens / generate_s,
    }


def busy_cpu_seconds() -> float:
    """CPU-seconds all processes have used (Linux /proc/stat): with this process's own, it
    tells whether another job shared the machine during the run and skewed the numbers."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def own_cpu_seconds() -> float:
    return time.process_time()


def hardware() -> dict:
    device = jax.devices()[0]
    cpu = platform.processor() or "unknown"
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if "Model name" in ln), cpu)
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


def describe(cfg: dict) -> str:
    return (
        f"{cfg['num_hidden_layers']} layers, width {cfg['hidden_size']}, MLP "
        f"{cfg['intermediate_size']}, {cfg['num_attention_heads']} heads / "
        f"{cfg['num_key_value_heads']} KV heads of {cfg['head_dim']}, "
        f"vocabulary {cfg['vocab_size']}"
    )


def markdown(report) -> str:
    hw, a = report["hardware"], report["args"]
    lines = [
        f"# Prefill and cached greedy decoding, tiny LLaVA and its LM ({report['date']})",
        "",
        f"Hardware: {hw['device_count']} x {hw['device_kind']} ({hw['platform']}), "
        f"CPU {hw['cpu']} x {hw['cpu_count']} cores, jax {hw['jax']}.  ",
        f"Command: `{report['command']}`  ",
        f"Other processes used {report['other_processes_cpu_s']:.0f} CPU-seconds during the "
        f"run's {report['wall_seconds']:.0f} s (0 on a quiet machine).",
        "",
        f"Models ({a['dtype']}): `lm` = the `{a['lm_size']}` decoder "
        f"({describe(report['lm_config'])}); `llava` = CLIP `{VISION}` image tower + LLaVA "
        "projector + the same decoder, one image per row (its visual tokens are part of the "
        "prompt length and the tower runs in the prefill). Prompts unpadded; no stop token. "
        "Decode step = (generation of "
        f"{a['new_tokens']} tokens - generation of 1) / {a['new_tokens'] - 1}: the loop's "
        "steps without the prefill; the cache holds prompt + new tokens. Medians of "
        f"{a['repeats']}+ interleaved calls after a warm-up. `lm` and `llava` decode with the "
        "same decoder, so their step times differ only by noise (a difference of two timings).",
        "",
        "| model | params (M) | batch | prompt | prefill (ms) | prefill tok/s | decode step "
        "(ms) | decode tok/s | generate (ms) | generate tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        decode = r["decode_tokens_per_second"]
        lines.append(
            f"| {r['model']} | {r['params_millions']:.1f} | {r['batch']} | "
            f"{r['prompt_length']} | {1e3 * r['prefill_seconds']:.1f} | "
            f"{r['prefill_tokens_per_second']:.0f} | {1e3 * r['decode_step_seconds']:.2f} | "
            f"{'n/a' if decode is None else f'{decode:.0f}'} | "
            f"{1e3 * r['generate_seconds']:.1f} | {r['generate_tokens_per_second']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def bench_train(connector, lm_size, batch, length, dtype, repeats, peak) -> dict:
    """The jitted train step of a VLM with `connector` on `batch` pairs of `length` tokens."""
    from fomo_jax import sharding
    from fomo_jax.continual.loop import finetuning
    from fomo_jax.data import vlm_batches as vb
    from fomo_jax.families import vlm as vlm_family
    from fomo_jax.train import optimizer

    lm = LM_SIZES[lm_size].replace(dtype=dtype)
    cfg = VLMConfig(vision=get_config(VISION, dtype=dtype), lm=lm, image_token_id=lm.vocab_size - 1,
                    connector=connector, perceiver_latents=16, perceiver_heads=8,
                    perceiver_kv_heads=4, perceiver_head_dim=32)  # fmt: skip
    graphdef, params = params_lib.split(create_vlm(cfg, seed=0))
    step, state = finetuning(graphdef, optimizer.adamw(), sharding.make_mesh(), params,
                             family=vlm_family.FAMILY)  # fmt: skip
    rng = np.random.default_rng(0)
    words = length - cfg.image_seq_length - 2
    examples = [vb.pair(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "x" * words)
                for _ in range(batch)]  # fmt: skip
    specials = vb.Specials(image=cfg.image_token_id, eos=258, eou=259, pad=0)
    data = vb.collate(examples, lambda s: [b + 1 for b in s.encode()], specials,
                      cfg.image_seq_length, length, 1, 64)  # fmt: skip
    compile_seconds, flops, footprint, seconds = measure_step(step, state, data, repeats)
    achieved = flops / seconds / 1e12
    return {
        "connector": connector, "batch": batch, "sequence_length": length, "dtype": dtype,
        "visual_tokens": cfg.image_seq_length,
        "params_millions": sum(np.size(x) for x in jax.tree_util.tree_leaves(params)) / 1e6,
        "compile_seconds": compile_seconds, "step_seconds": seconds,
        "tokens_per_second": batch * length / seconds, "xla_flops_per_step": flops,
        "achieved_tflops": achieved, "peak_tflops": peak, "mfu": achieved / peak,
        "compiled_memory_gib": None if footprint is None else footprint / 2**30,
    }  # fmt: skip


def train_markdown(report) -> str:
    hw, a = report["hardware"], report["args"]
    lines = [
        f"# VLM train step per connector ({report['date']})", "",
        f"Hardware: {hw['device_count']} x {hw['device_kind']} ({hw['platform']}), CPU "
        f"{hw['cpu']} x {hw['cpu_count']} cores, jax {hw['jax']}.  ",
        f"Command: `{report['command']}`  ",
        f"Other processes used {report['other_processes_cpu_s']:.0f} CPU-seconds during the "
        f"run's {report['wall_seconds']:.0f} s (0 on a quiet machine).", "",
        f"Model ({a['dtype']}): CLIP `{VISION}` image tower (64 px, 64 patches) + connector + "
        f"the `{a['lm_size']}` decoder ({describe(report['lm_config'])}); the family's "
        "next-token loss and AdamW over every parameter, one jitted step; each row a batch of "
        "image-caption pairs filling the sequence. MFU: achieved TFLOP/s (XLA-counted FLOPs / "
        f"step time) over {report['peak_source']} ({report['peak_tflops']:.2f} TFLOP/s).", "",
        "| connector | visual tokens | params (M) | batch x length | step (ms) | tokens/s | "
        "XLA GFLOP/step | TFLOP/s | MFU | compiled memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in report["results"]:
        memory = r["compiled_memory_gib"]
        memory = "n/a" if memory is None else f"{memory * 1024:.0f}"
        lines.append(
            f"| {r['connector']} | {r['visual_tokens']} | {r['params_millions']:.2f} | "
            f"{r['batch']} x {r['sequence_length']} | {1e3 * r['step_seconds']:.1f} | "
            f"{r['tokens_per_second']:.0f} | {r['xla_flops_per_step'] / 1e9:.2f} | "
            f"{r['achieved_tflops']:.3f} | {100 * r['mfu']:.1f}% | {memory} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="lm,llava", help="comma-separated: lm, llava")
    parser.add_argument("--lm_size", default="tiny", choices=sorted(LM_SIZES))
    parser.add_argument(
        "--shapes", default="1:128,8:128,32:128,1:512,8:512,32:512",
        help="comma-separated batch:prompt_length pairs",
    )  # fmt: skip
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens generated per row")
    parser.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on GPUs)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    parser.add_argument("--out", default="benchmarks/results/vlm_step")
    parser.add_argument("--mode", default="decode", choices=["decode", "train"])
    parser.add_argument("--connectors", default="linear,mlp2x_gelu,mlp_downsample,perceiver")
    parser.add_argument("--train_shapes", default="8:128", help="batch:sequence_length pairs")
    args = parser.parse_args()
    if args.mode == "train":
        return train_main(args)
    if args.new_tokens < 2:
        parser.error("--new_tokens must be at least 2 (a decode step is a difference)")
    runtime.enable_compilation_cache()

    start, busy, own = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
    results = []
    for kind in args.models.split(","):
        model = build(kind, args.lm_size, args.dtype)
        for batch, length in parse_shapes(args.shapes):
            results.append(bench(model, kind, batch, length, args.new_tokens, args.repeats))
            print(json.dumps(results[-1]), flush=True)
    report = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "hardware": hardware(),
        "args": vars(args),
        "lm_config": LM_SIZES[args.lm_size].to_dict(),
        "results": results,
        "wall_seconds": time.perf_counter() - start,
        "other_processes_cpu_s": busy_cpu_seconds() - busy - (own_cpu_seconds() - own),
    }
    write(report, markdown(report), args.out)


def write(report: dict, table: str, out: str) -> None:
    """`<out>.json` (every number) and `<out>.md` (the table), and the table on stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(table)
    print(table)


def train_main(args):
    runtime.enable_compilation_cache()
    start, busy, own = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
    device = jax.devices()[0]
    if args.dtype in PEAK_TFLOPS.get(device.device_kind, {}):
        peak, source = PEAK_TFLOPS[device.device_kind][args.dtype], "the datasheet dense peak"
    else:
        import jax.numpy as jnp

        peak = measured_matmul_peak(jnp.dtype(args.dtype))
        source = "a measured 2048^3 matmul's throughput"
    results = []
    for connector in args.connectors.split(","):
        for batch, length in parse_shapes(args.train_shapes):
            results.append(bench_train(connector, args.lm_size, batch, length, args.dtype,
                                       args.repeats, peak))  # fmt: skip
            print(json.dumps(results[-1]), flush=True)
    report = {
        "date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
        "hardware": hardware(), "args": vars(args), "lm_config": LM_SIZES[args.lm_size].to_dict(),
        "peak_tflops": peak, "peak_source": source, "results": results,
        "wall_seconds": time.perf_counter() - start,
        "other_processes_cpu_s": busy_cpu_seconds() - busy - (own_cpu_seconds() - own),
    }  # fmt: skip
    write(report, train_markdown(report), args.out)


if __name__ == "__main__":
    main()
