"""Per-device memory of the contrastive losses: dense against chunked, at a large batch.

Compiles (never runs: abstract inputs, nothing allocated) the loss and its gradients with
respect to both embeddings and the logit scale (and SigLIP's bias), with the batch split over
8 fake CPU devices (`data`=8), and reports the per-device temporary bytes of
`compiled.memory_analysis()`. The dense losses build the global B x B logits on every device
(O(B²/N)); the chunked ones keep O(B/N x chunk) blocks (`fomo_jax.train.losses`). "chunked,
no mesh" is the chunked loss traced without a mesh (as a step jitted outside `jax.set_mesh`
sees it): one shard, partitioned by XLA. The CPU compiler's buffer assignment is a proxy for
an accelerator's: compare the rows with each other, not with a GPU's memory.

    python benchmarks/contrastive_memory.py  # 2-core dev machine: about a minute
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks.clip_step import hardware, write_report  # noqa: E402
from fomo_jax import sharding  # noqa: E402
from fomo_jax.train import losses  # noqa: E402

GIB = 2**30


def variants(mesh, chunks):
    """name -> (loss of (image, text, scale, bias), uses the bias): the dense losses, the
    chunked ones at each chunk size, and the chunked CLIP loss without a mesh."""

    def clip_chunked(c, on_mesh=True):
        m = mesh if on_mesh else None
        return lambda i, t, s, b: losses.chunked_clip_loss(i, t, s, mesh=m, chunk_size=c)[0]

    def siglip_chunked(c):
        def loss(i, t, s, b):
            return losses.chunked_siglip_loss(i, t, s, b, mesh=mesh, chunk_size=c)[0]

        return loss

    out = {"clip (dense)": (lambda i, t, s, b: losses.clip_loss(i, t, s)[0], False)}
    for c in chunks:
        out[f"clip_chunked (chunk {c})"] = (clip_chunked(c), False)
    out[f"clip_chunked, no mesh (chunk {chunks[0]})"] = (clip_chunked(chunks[0], False), False)
    out["siglip (dense)"] = (lambda i, t, s, b: losses.siglip_loss(i, t, s, b)[0], True)
    for c in chunks:
        out[f"siglip_chunked (chunk {c})"] = (siglip_chunked(c), True)
    return out


def measure(fn, bias, mesh, batch, dim):
    rows = NamedSharding(mesh, P(sharding.BATCH))
    scalar = NamedSharding(mesh, P())
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=rows)
    one = jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar)
    argnums = (0, 1, 2, 3) if bias else (0, 1, 2)
    grad = jax.jit(jax.value_and_grad(fn, argnums=argnums))
    compiled = grad.lower(emb, emb, one, one).compile()
    memory = compiled.memory_analysis()
    return {
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
    }


def markdown(report) -> str:
    hw = report["hardware"]
    lines = [
        f"# Contrastive loss memory per device ({report['date']})",
        "",
        f"Hardware: {hw['device_count']} x {hw['device_kind']} ({hw['platform']}, fake devices "
        f"of one host), CPU {hw['cpu']} x {hw['cpu_count']} cores, jax {hw['jax']}.  ",
        f"Command: `{report['command']}`",
        "",
        "Loss + gradients (embeddings, logit scale, SigLIP's bias) compiled for abstract inputs "
        f"with the batch split over {report['devices']} devices (mesh data={report['devices']}); "
        "temporaries per device from `compiled.memory_analysis()`. This is the CPU compiler's "
        "buffer assignment, a proxy for an accelerator's (compare rows, not absolute numbers "
        "with a GPU). *no mesh*: the chunked loss traced outside `jax.set_mesh` (one shard "
        "partitioned by XLA). At 8 devices a device holds B/8 = 4096 rows: chunk 4096 is one "
        "block per ring step.",
        "",
        "| loss | batch | dim | temp per device (MiB) | vs dense | args (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['loss']} | {r['batch']} | {r['dim']} | {r['temp_bytes'] / 2**20:.1f} | "
            f"{r['vs_dense']:.3f} | {r['argument_bytes'] / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32768)
    parser.add_argument("--dims", default="768,1024")
    parser.add_argument("--chunks", default="1024,256,4096", help="chunk sizes (texts)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results",
                                                      "contrastive_memory_cpu"))  # fmt: skip
    args = parser.parse_args()
    mesh = sharding.make_mesh(8, 1, 1)
    rows = []
    for dim in (int(d) for d in args.dims.split(",")):
        dense = {}
        chunks = [int(c) for c in args.chunks.split(",")]
        for name, (fn, bias) in variants(mesh, chunks).items():
            r = dict(loss=name, batch=args.batch, dim=dim, **measure(fn, bias, mesh, args.batch,
                                                                     dim))  # fmt: skip
            family = name.split(" ")[0].split("_")[0]
            if "dense" in name:
                dense[family] = r["temp_bytes"]
            r["vs_dense"] = r["temp_bytes"] / dense[family]
            rows.append(r)
            print(f"{name:40s} B={args.batch} D={dim}: {r['temp_bytes'] / GIB:.3f} GiB temp",
                  flush=True)  # fmt: skip
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "hardware": hardware(),
        "devices": 8,
        "chunks": args.chunks,
        "rows": rows,
    }
    write_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
