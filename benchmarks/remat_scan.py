"""What the memory levers of the model configs buy (`fomo_jax.models.stack`): rematerialisation
and scan over the blocks, on the CLIP loss + gradient (both towers).

    python benchmarks/remat_scan.py --model small --batch 64 --depths 2,4,8,16 \
        --out benchmarks/results/remat_scan_cpu

For every remat mode ("none", "full", "save_matmuls") at the largest depth, and for every depth
with scan off and on (remat "none"), it jits `value_and_grad` of a contrastive loss, and
reports XLA's memory analysis of the compiled program (temporaries: activations kept for the
backward pass and scratch; arguments: parameters and batch), the lowering and compile times,
and the size of the lowered program (StableHLO lines). Nothing is run: the numbers are the
compiler's. Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.clip_step import hardware, write_report  # noqa: E402
from fomo_jax import models  # noqa: E402
from fomo_jax import params as params_lib  # noqa: E402
from fomo_jax.models import clip  # noqa: E402

MIB = 2**20


def measure(cfg, batch: int) -> dict:
    """Lower and compile the loss + gradient of `cfg` on a batch (shapes only, no weights)."""
    graphdef, params = params_lib.split(clip.abstract_clip(cfg))
    v, t = cfg.vision, cfg.text
    pixels = jax.ShapeDtypeStruct((batch, v.image_size, v.image_size, 3), jnp.float32)
    ids = jax.ShapeDtypeStruct((batch, t.context_length), jnp.int32)

    def loss(params, pixels, ids):
        image, text, _ = params_lib.merge(graphdef, params)(pixels, ids)
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        logits = 10.0 * image @ text.T
        return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits)))

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    lowered = step.lower(params, pixels, ids)
    lowered_s = time.perf_counter() - start
    hlo_lines = lowered.as_text().count("\n")
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return dict(
        depth=v.layers, remat=cfg.remat, scan=cfg.scan, batch=batch,
        temp_mib=memory.temp_size_in_bytes / MIB,
        argument_mib=memory.argument_size_in_bytes / MIB,
        lower_seconds=lowered_s, compile_seconds=compile_s, hlo_lines=hlo_lines,
    )  # fmt: skip


def config(name: str, depth: int, remat: str, scan: bool):
    base = models.get_config(name)
    return base.replace(
        vision=dataclasses.replace(base.vision, layers=depth),
        text=dataclasses.replace(base.text, layers=depth),
        remat=remat, scan=scan,
    )  # fmt: skip


def markdown(report) -> str:
    hw = report["hardware"]
    lines = [
        f"# Memory levers: remat and scan ({report['date']})",
        "",
        f"Hardware: {hw['device_count']} x {hw['device_kind']} ({hw['platform']}), "
        f"CPU {hw['cpu']} x {hw['cpu_count']} cores, jax {hw['jax']}.  ",
        f"Command: `{report['command']}`",
        "",
        f"CLIP `{report['model']}` with both towers at the given depth, batch {report['batch']}, "
        "jitted loss + gradient (float32). Memory from XLA's memory analysis of the compiled "
        "program (temporaries = what the backward pass keeps plus scratch); times are lowering "
        "and compiling on this machine (one sample each, a shared machine: read the trend).",
        "",
        "| depth | remat | scan | temp (MiB) | params + batch (MiB) | lower (s) | compile (s) | "
        "StableHLO lines |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['depth']} | {r['remat']} | {r['scan']} | {r['temp_mib']:.1f} | "
            f"{r['argument_mib']:.1f} | {r['lower_seconds']:.2f} | {r['compile_seconds']:.2f} | "
            f"{r['hlo_lines']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--depths", default="2,4,8,16")
    parser.add_argument("--out", default="benchmarks/results/remat_scan_cpu")
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    rows = []
    for remat in ("none", "full", "save_matmuls"):
        for scan in (False, True):
            rows.append(measure(config(args.model, depths[-1], remat, scan), args.batch))
            print(rows[-1], flush=True)
    for depth in depths[:-1]:
        for scan in (False, True):
            rows.append(measure(config(args.model, depth, "none", scan), args.batch))
            print(rows[-1], flush=True)
    rows.sort(key=lambda r: (r["depth"], r["remat"] != "none", r["remat"], r["scan"]))
    report = dict(
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command="python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]]),
        hardware=hardware(), model=args.model, batch=args.batch, rows=rows,
        summary=dict(
            temp_ratio_full=_ratio(rows, depths[-1], "full"),
            temp_ratio_save_matmuls=_ratio(rows, depths[-1], "save_matmuls"),
        ),
    )  # fmt: skip
    write_report(args.out, report, markdown(report))


def _ratio(rows, depth, remat):
    """Temporaries of `remat` over those of no remat (scan off, at `depth`)."""
    pick = lambda mode: next(  # noqa: E731
        r["temp_mib"] for r in rows if (r["depth"], r["remat"], r["scan"]) == (depth, mode, False)
    )
    return float(np.round(pick(remat) / pick("none"), 3))


if __name__ == "__main__":
    main()
