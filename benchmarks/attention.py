"""Attention backends (pallas, cudnn, xla): TFLOP/s forward and forward+backward, peak memory.

    python benchmarks/attention.py                # GPU/TPU: CLIP and long-sequence shapes
    python benchmarks/attention.py --smoke        # CPU: tiny shapes, Pallas interpreted

Shapes: ViT-B/16 training (batch 256, 197 tokens, 12 heads of 64, no mask), the text tower
(batch 256, 77 tokens, 8 heads of 64, causal) and long sequences (2k, 4k and 8k tokens,
16 heads of 128, 32k tokens per batch, causal and prefix-LM with half the sequence as
prefix), in bfloat16. For every shape and backend it compiles the forward (attention(q, k,
v)) and the forward+backward (the vjp of sum(out * g) with respect to q, k and v), checks the
forward against a float32 XLA reference on the first batch row, and times both (median).
FLOPs count only the visible (query, key) pairs: 4 * head_dim per pair forward (two
matmuls) and 2.5 times that backward (five matmuls), so causal attention does about half
the work of full attention and TFLOP/s compare fairly across masks and backends.

Peak memory: on an accelerator every (shape, backend) runs in a fresh child process that
reads the device's peak_bytes_in_use after the forward and again after forward+backward
(inputs included). Where the device keeps no statistics (CPU) it is the compiled
executable's memory analysis: arguments + outputs + temporaries.

Backends that cannot run a case (cuDNN off GPU, cuDNN with a prefix mask) are skipped with
the reason. Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clip_step import median_time  # noqa: E402  (benchmarks/ is the script's folder)

from fomo_jax import kernels, runtime  # noqa: E402

BACKENDS = ("pallas", "cudnn", "xla")
LONG_TOKENS = 32768


def shapes(smoke: bool) -> list[dict]:
    """The benchmark cases: name, batch, seq, heads, head_dim, mask ("none"/"causal"/"prefix")."""
    if smoke:
        return [
            dict(name="vit-like", batch=2, seq=37, heads=2, head_dim=32, mask="none"),
            dict(name="text-like", batch=2, seq=23, heads=2, head_dim=32, mask="causal"),
            dict(name="prefix-LM", batch=1, seq=70, heads=2, head_dim=64, mask="prefix"),
        ]
    cases = [
        dict(name="ViT-B/16", batch=256, seq=197, heads=12, head_dim=64, mask="none"),
        dict(name="text tower", batch=256, seq=77, heads=8, head_dim=64, mask="causal"),
    ]
    for seq in (2048, 4096, 8192):
        for mask in ("causal", "prefix"):
            cases.append(
                dict(
                    name=f"long {seq // 1024}k",
                    batch=LONG_TOKENS // seq,
                    seq=seq,
                    heads=16,
                    head_dim=128,
                    mask=mask,
                )
            )
    return cases


def visible_pairs(case) -> int:
    """(query, key) pairs a mask leaves visible, summed over the batch."""
    seq = case["seq"]
    per_query = {
        "none": np.full(seq, seq),
        "causal": np.arange(1, seq + 1),
        "prefix": np.maximum(np.arange(1, seq + 1), seq // 2),
    }[case["mask"]]
    return case["batch"] * int(per_query.sum())


def unavailable(backend, case) -> str | None:
    """Why `backend` cannot run `case` here, or None."""
    if backend == "cudnn" and jax.default_backend() != "gpu":
        return "cuDNN needs a GPU"
    if backend == "cudnn" and case["mask"] == "prefix":
        return "cuDNN has no prefix-LM mask"
    return None


def compiled_bytes(compiled) -> int | None:
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return (
        memory.temp_size_in_bytes
        + memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_case(case, backend, repeats, read_peak=False) -> dict:
    """Compile, check and time one (shape, backend); `read_peak`: this process's own run."""
    batch, seq, heads, dim = case["batch"], case["seq"], case["heads"], case["head_dim"]
    rng = np.random.default_rng(0)
    q, k, v, g = (
        jnp.asarray(rng.standard_normal((batch, seq, heads, dim)), jnp.bfloat16) for _ in range(4)
    )
    masks = dict(causal=case["mask"] == "causal")
    if case["mask"] == "prefix":
        masks["prefix_length"] = jnp.full((batch,), seq // 2, jnp.int32)

    def forward(q, k, v):
        return kernels.attention(q, k, v, **masks, implementation=backend)

    def forward_backward(q, k, v):
        out, vjp = jax.vjp(forward, q, k, v)
        return out, vjp(g)

    row = {"backend": backend}
    flops = 4 * dim * heads * visible_pairs(case)
    for name, fn, pass_flops in (
        ("fwd", forward, flops),
        ("fwd_bwd", forward_backward, 3.5 * flops),
    ):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(q, k, v).compile()
        row[f"{name}_compile_s"] = time.perf_counter() - start
        row[f"{name}_compiled_bytes"] = compiled_bytes(compiled)
        result = jax.block_until_ready(compiled(q, k, v))
        seconds = median_time(lambda c=compiled: jax.block_until_ready(c(q, k, v)), repeats)
        row[f"{name}_ms"] = 1e3 * seconds
        row[f"{name}_tflops"] = pass_flops / seconds / 1e12
        row[f"{name}_peak_bytes"] = device_peak_bytes() if read_peak else None
        if name == "fwd":
            row["max_abs_err"] = first_row_error(result, q, k, v, masks)
    return row


def first_row_error(out, q, k, v, masks) -> float:
    """max |out - float32 XLA reference| on batch row 0 (cheap even at 8k tokens)."""
    first = dict(masks)
    if "prefix_length" in masks:
        first["prefix_length"] = masks["prefix_length"][:1]
    want = kernels.reference_attention(*(x[:1].astype(jnp.float32) for x in (q, k, v)), **first)
    return float(jnp.abs(out[:1].astype(jnp.float32) - want).max())


def run_isolated(case, backend, repeats) -> dict:
    """`run_case` in a fresh process, so that the device's peak memory is this case's own."""
    command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps([case, backend])]
    command += ["--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:  # report the exception line (e.g. an out-of-memory error)
        lines = (done.stderr or done.stdout).strip().splitlines() or ["failed"]
        errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
        return {"backend": backend, "error": (errors or lines)[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def hardware() -> dict:
    device = jax.devices()[0]
    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
    }


def size(n_bytes) -> str:
    if n_bytes is None:
        return "–"
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.2f} MiB"


def markdown(report) -> str:
    hw = report["hardware"]
    lines = [
        f"# Attention backends ({report['date']})",
        "",
        f"Hardware: {hw['device_kind']} ({hw['platform']}), CPU {hw['cpu']} x "
        f"{hw['cpu_count']} cores, jax {hw['jax']}.  ",
        f"Command: `{report['command']}`  ",
        f"Memory: {report['memory_source']}. TFLOP/s count visible (query, key) pairs only; "
        "bfloat16 inputs. Error: max |out - float32 XLA reference| on batch row 0.",
        "",
    ]
    if hw["platform"] == "cpu":
        lines += [
            "On CPU the Pallas kernel runs in the Pallas interpreter: its rows check that it "
            "runs, their times say nothing about the kernel.",
            "",
        ]
    lines += [
        "| shape | batch | seq | heads x dim | mask | backend | fwd (ms) | fwd TFLOP/s | "
        "fwd+bwd (ms) | fwd+bwd TFLOP/s | memory fwd / fwd+bwd | max err | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        c = r["case"]
        head = (
            f"| {c['name']} | {c['batch']} | {c['seq']} | {c['heads']} x {c['head_dim']} | "
            f"{c['mask']} | {r['backend']} |"
        )
        note = r.get("skipped") or r.get("error")
        if note:
            lines.append(head + " – | – | – | – | – | – | " + note.replace("|", "/") + " |")
            continue
        source = "peak" if r["fwd_peak_bytes"] is not None else "compiled"
        memory = f"{size(r[f'fwd_{source}_bytes'])} / {size(r[f'fwd_bwd_{source}_bytes'])}"
        lines.append(
            head + f" {r['fwd_ms']:.3f} | {r['fwd_tflops']:.3g} | {r['fwd_bwd_ms']:.3f} | "
            f"{r['fwd_bwd_tflops']:.3g} | {memory} | {r['max_abs_err']:.1e} | |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: interpreted)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--repeats", type=int, default=10, help="timed calls (median reported)")
    parser.add_argument("--in_process", action="store_true", help="no child process per case")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON [case, backend]: one run
    parser.add_argument(
        "--out", default=None, help="default: benchmarks/results/attention_<platform>"
    )
    args = parser.parse_args()
    runtime.enable_compilation_cache()
    if args.child:
        print(json.dumps(run_case(*json.loads(args.child), args.repeats, read_peak=True)))
        return

    accelerator = device_peak_bytes() is not None
    isolate = accelerator and not args.in_process
    results = []
    for case in shapes(args.smoke):
        for backend in args.backends.split(","):
            reason = unavailable(backend, case)
            if reason:
                print(f"{case['name']} {case['mask']}: skipping {backend}: {reason}")
                results.append({"case": case, "backend": backend, "skipped": reason})
                continue
            row = (run_isolated if isolate else run_case)(case, backend, args.repeats)
            results.append({"case": case, **row})
            print(case["name"], case["mask"], json.dumps(row))
    report = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "hardware": hardware(),
        "memory_source": (
            "device peak_bytes_in_use, one process per row"
            if isolate
            else "compiled memory analysis (arguments + outputs + temporaries)"
        ),
        "results": results,
    }
    out = args.out or f"benchmarks/results/attention_{jax.default_backend()}"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(out + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
