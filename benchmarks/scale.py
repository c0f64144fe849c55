"""The scale report: the one train step compiled for large models on 8, 64 and 256 devices.

    nice -n 19 python benchmarks/scale.py  # 2-core dev machine: see the results file
    python benchmarks/scale.py --compile_all  # every cell compiled (hours on 2 cores)
    python benchmarks/scale.py --smoke     # a tiny VLM on 2 and 8 devices (a minute)

For every model x device count x mesh kind it lowers `fomo_jax.train.step`'s jitted step (full
fine-tuning, AdamW, the family's loss) from abstract inputs (`jax.ShapeDtypeStruct`s: nothing
is allocated, nothing runs) on fake CPU devices (`--xla_force_host_platform_device_count`),
with the global batch scaled with the mesh (`--per_device_batch` x devices), and reports per
device: the bytes of parameters and of optimizer state (the shards the sharding rules give,
`sharding.tree_specs`), the compiler's argument and temporary bytes
(`compiled.memory_analysis()`), XLA's FLOPs (`compiled.cost_analysis()`), the collectives in
the compiled HLO, and the lowering + compile time. Mesh kinds: `fsdp` (data=1 x fsdp=N) and
`fsdp_tp` (fsdp=N/tp x model=tp). A model whose leaves the rules cannot split over the mesh
(`sharding.spec_for` raises, e.g. ViT-bigG-14's width 1664 over fsdp=256) is compiled with the
FSDP degree split over two axes (fsdp=128 x fsdp_transpose=2, each large leaf split over two
of its dimensions) and the error is recorded. The models pin each block's activations to the
batch sharding (`sharding.constrain_batch`); rows of reports made before they did are marked
"unconstrained" when combined.
The CPU compiler's buffer assignment is a proxy for an accelerator's. Writes `<out>.json` and
`<out>.md`.
"""

from __future__ import annotations

import os
import sys

DEVICES = 8 if "--smoke" in sys.argv else 256
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.clip_step import hardware, write_report  # noqa: E402
from fomo_jax import families, models, runtime, sharding  # noqa: E402
from fomo_jax import params as params_lib  # noqa: E402
from fomo_jax.continual.methods import Method  # noqa: E402
from fomo_jax.models.llama import LlamaConfig  # noqa: E402
from fomo_jax.models.vlm import VLMConfig  # noqa: E402
from fomo_jax.train import optimizer  # noqa: E402
from fomo_jax.train import step as step_lib  # noqa: E402

MIB = 2**20
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
# One compiled instruction (or its async start) per collective: `all-gather(` / `all-gather-start(`.
COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def llava_7b(dtype: str, scan: bool, remat: str = "none") -> VLMConfig:
    """A LLaVA-1.5-7B-shaped VLM: ViT-L/14-336 image tower, mlp2x_gelu connector and a
    Llama-2-7B-shaped LM (4096 wide, 32 layers, 32 heads, MLP 11008, vocabulary 32064)."""
    levers = dict(dtype=dtype, scan=scan, remat=remat)
    lm = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096,
                     **levers)  # fmt: skip
    return VLMConfig(vision=models.get_config("ViT-L-14-336", **levers), lm=lm,
                     image_token_id=32000, connector="mlp2x_gelu")  # fmt: skip


def tiny_vlm(dtype: str, scan: bool, remat: str = "none") -> VLMConfig:
    """The smoke's VLM: the tiny CLIP image tower and a 2-layer LM."""
    levers = dict(dtype=dtype, scan=scan, remat=remat)
    lm = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                     **levers)  # fmt: skip
    return VLMConfig(vision=models.get_config("tiny", **levers), lm=lm, image_token_id=500)


def model_config(name: str, dtype: str, scan: bool, remat: str = "none"):
    """(family, config) of a report's model name."""
    if name == "LLaVA-7B":
        return families.get("vlm"), llava_7b(dtype, scan, remat)
    if name == "tiny-VLM":
        return families.get("vlm"), tiny_vlm(dtype, scan, remat)
    return families.get("clip"), models.get_config(name, dtype=dtype, scan=scan, remat=remat)


def mesh_shape(kind: str, devices: int, tp: int, transpose: int = 1) -> tuple[int, ...]:
    """(data, fsdp, fsdp_transpose, model) of a mesh kind on `devices` devices."""
    model = tp if kind == "fsdp_tp" else 1
    return 1, devices // (transpose * model), transpose, model


def shard_bytes(tree, mesh, rules) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs) under the rules (the largest shard
    of each leaf: every device holds the same under even splits)."""
    specs = sharding.tree_specs(tree, mesh, rules)
    total = 0
    for leaf, spec in zip(jax.tree.leaves(tree),
                          jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.P)),
                          strict=True):  # fmt: skip
        shape = jax.sharding.NamedSharding(mesh, spec).shard_shape(leaf.shape)
        total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


def full_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def count_collectives(hlo: str) -> dict:
    """Collective instructions in compiled HLO text, by kind (each appears once: a collective
    inside a scanned loop body counts once however many times the loop runs)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for match in COLLECTIVE_RE.finditer(hlo):
        counts[match.group(1)] += 1
    return counts


def measure(name: str, kind: str, devices: int, *, tp: int, per_device_batch: int, dtype: str,
            scan: bool, remat: str = "none", compile: bool = True) -> dict:  # fmt: skip
    """Compile the train step of `name` on a `kind` mesh of the first `devices` devices (only
    the per-device parameter and optimizer bytes without `compile`)."""
    family, cfg = model_config(name, dtype, scan, remat)
    graphdef, params = params_lib.split(family.abstract_model(cfg))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    method, tx = Method(), optimizer.adamw()  # full fine-tuning
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    state = jax.eval_shape(lambda p: step_lib.fresh_state(p, method, tx, key), params)
    row = dict(model=name, kind=kind, devices=devices, dtype=dtype, scan=scan, remat=remat,
               param_count=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
               param_bytes_total=full_bytes(params),
               opt_bytes_total=full_bytes(state.opt_state), rule_error=None, compiled=compile,
               batch_constraint=True)  # fmt: skip
    shape = mesh_shape(kind, devices, tp)
    try:
        sharding.tree_specs(params, jax.sharding.AbstractMesh(shape, sharding.AXES), family.rules)
    except ValueError as error:  # the rules cannot split a leaf 1 x N: split FSDP over two axes
        row["rule_error"] = str(error)
        shape = mesh_shape(kind, devices, tp, transpose=2)
    data, fsdp, transpose, model = shape
    mesh = sharding.make_mesh(data, fsdp, model, devices=jax.devices()[:devices],
                              fsdp_transpose=transpose)  # fmt: skip
    row.update(data=data, fsdp=fsdp, fsdp_transpose=transpose, model_axis=model)
    row["param_bytes"] = shard_bytes(params, mesh, family.rules)
    row["opt_bytes"] = shard_bytes(state.opt_state, mesh, family.rules)
    batch_size = per_device_batch * devices
    row["batch"] = batch_size
    if not compile:
        return row
    batch = family.abstract_batch(cfg, batch_size)
    shardings = step_lib.shardings_of(state, mesh, family.rules)
    jitted = step_lib.compile_step(family, graphdef, tx, method, mesh, shardings)
    start = time.perf_counter()
    lowered = jitted.lower(state, batch, jax.ShapeDtypeStruct((), jnp.float32))
    lower_seconds = time.perf_counter() - start
    compiled = lowered.compile()
    compile_seconds = time.perf_counter() - start - lower_seconds
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    row.update(
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        flops_per_device=float(cost.get("flops", 0.0)),
        collectives=count_collectives(compiled.as_text()),
        lower_seconds=lower_seconds,
        compile_seconds=compile_seconds,
    )
    return row


def cell(row) -> tuple:
    """A row's cell of the matrix (rows of earlier runs may lack `batch_constraint`)."""
    keys = ("model", "kind", "devices", "remat", "scan")
    return (*(row.get(k) for k in keys), bool(row.get("batch_constraint")))


def read_part(path: str) -> dict:
    """An earlier run: its .json report, or the JSON rows it printed (a log; its first line
    the command, `# command: ...`)."""
    with open(path) as f:
        if path.endswith(".json"):
            return json.load(f)
        lines = f.read().splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    command = next((ln[len("# command: ") :] for ln in lines if ln.startswith("# command: ")), path)
    seconds = sum(r.get("lower_seconds", 0) + r.get("compile_seconds", 0) for r in rows)
    return dict(rows=rows, total_seconds=seconds, command=command)


def contrastive_figure(path: str) -> list[dict]:
    """The B = 32k rows of `benchmarks/contrastive_memory.py`'s results (8 devices), if any."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        report = json.load(f)
    return [dict(r, date=report["date"], command=report["command"]) for r in report["rows"]
            if r["batch"] == 32768]  # fmt: skip


def fmt_mib(n) -> str:
    return f"{n / MIB:,.1f}" if n < 100 * MIB else f"{n / MIB:,.0f}"


def table(rows, ratios: bool = True) -> list[str]:
    """The markdown table of `rows` (`ratios`: the (p+o) x N/N0 column filled)."""
    lines = [
        "| model | params (M) | devices | mesh (data x fsdp x fsdp_t x model) | batch | "
        "params/dev (MiB) | ideal params/dev (MiB) | opt/dev (MiB) | (p+o) x N/N0 | "
        "args/dev (MiB) | temp/dev (MiB) | TFLOP/dev | AG | RS | AR | CP | A2A | compile (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = {}
    for r in rows:
        key = (r["model"], r["kind"], r["remat"], r["scan"], r.get("batch_constraint"))
        base = first.setdefault(key, r)
        # (params + opt) per device relative to the model's first device count, times N over
        # that count: 1.00 is an exact 1/N fall.
        ratio = ((r["param_bytes"] + r["opt_bytes"]) / (base["param_bytes"] + base["opt_bytes"])
                 * r["devices"] / base["devices"])  # fmt: skip
        name = r["model"] + (f" remat={r['remat']}" if r["remat"] != "none" else "")
        name += ("" if r["scan"] else " (no scan)") + (
            "" if r.get("batch_constraint") else " (unconstrained)"
        )
        note = " (*)" if r["rule_error"] else ""
        mesh = f"{r['data']} x {r['fsdp']} x {r.get('fsdp_transpose', 1)} x {r['model_axis']}"
        cells = [
            name, f"{r['param_count'] / 1e6:,.0f}", r["devices"],
            f"{r['kind']}: {mesh}{note}", r["batch"],
            fmt_mib(r["param_bytes"]), fmt_mib(r["param_bytes_total"] / r["devices"]),
            fmt_mib(r["opt_bytes"]), f"{ratio:.2f}" if ratios else "",
        ]  # fmt: skip
        if r.get("compiled", True):
            c = r["collectives"]
            cells += [
                fmt_mib(r["argument_bytes"]), fmt_mib(r["temp_bytes"]),
                f"{r['flops_per_device'] / 1e12:.3g}", *(c[k] for k in COLLECTIVES),
                f"{r['lower_seconds'] + r['compile_seconds']:.0f}",
            ]  # fmt: skip
        else:
            cells += ["not compiled"] + [""] * 8
        lines.append("| " + " | ".join(str(x) for x in cells) + " |")
    return lines


def markdown(report) -> str:
    hw = report["hardware"]
    lines = [
        f"# Scale report: the train step on 8 to 256 devices ({report['date']})",
        "",
        f"Hardware: {hw['device_count']} x {hw['device_kind']} ({hw['platform']}, fake devices "
        f"of one host), CPU {hw['cpu']} x {hw['cpu_count']} cores, jax {hw['jax']}.  ",
        f"Command: `{report['command']}` (total {report['total_seconds'] / 60:.1f} min)",
        "",
        "`fomo_jax.train.step`'s jitted step (full fine-tuning, AdamW, float32 parameters and "
        f"optimizer state, {report['dtype']} compute, scan over the blocks: "
        f"{report['scan']}) lowered from abstract inputs and compiled, never run; global batch "
        f"= {report['per_device_batch']} x devices. Mesh kinds: `fsdp` = data 1 x fsdp N, "
        f"`fsdp_tp` = fsdp N/{report['tp']} x model {report['tp']}. Per device: params and "
        "optimizer state = the shards the sharding rules give; args and temp = "
        "`compiled.memory_analysis()` (args: params + optimizer state + batch; temp: "
        "activations kept for the backward pass and scratch). **The CPU compiler's buffer "
        "assignment is a proxy for an accelerator's**: compare rows with each other, not with "
        "a GPU's memory. TFLOP/dev: XLA's cost analysis of the per-device program (a scanned "
        "loop body is counted once, not per layer: compare rows of one model only). "
        "Collectives: instructions in the compiled HLO (AG all-gather, RS reduce-scatter, AR "
        "all-reduce, CP collective-permute, A2A all-to-all; one per instruction, a loop body's "
        "once). Compile: lowering + XLA compile on this shared 2-core machine, one sample. "
        "(p+o) x N/N0: params + optimizer bytes per device over those at the model's first "
        "device count N0, times N/N0 (1.00: exactly 1/N); ideal: all parameters split evenly "
        "over all N devices. *not compiled*: bytes from the rules only (by default the first "
        "mesh kind is compiled at the first and last device counts, and the remat cell; "
        "`--compile_all` compiles every cell, hours on 2 cores).",
        "",
    ]
    now = [r for r in report["rows"] if r.get("batch_constraint")]
    before = [r for r in report["rows"] if not r.get("batch_constraint")]
    lines += table(now)
    if before:
        lines += ["", "## Before the batch constraint (unconstrained activations)", "",
                  "Rows of an earlier report, compiled before the models pinned their "
                  "activations to the batch sharding (`sharding.constrain_batch`): the "
                  "temporaries and FLOPs per device grew with the mesh.", ""]  # fmt: skip
        lines += table([r for r in before if r.get("compiled", True)], ratios=False)
    errors = {r["rule_error"] for r in now if r.get("rule_error")}
    if errors:
        lines += ["", "(*) The rules cannot split a leaf over fsdp N on this mesh kind; "
                  "compiled with fsdp N/2 x fsdp_transpose 2 (rows of the earlier report: "
                  "with the data axis doubled). The error `sharding.spec_for` raised:",
                  ""]  # fmt: skip
        lines += [f"- {e}" for e in sorted(errors)]
    if report["contrastive"]:
        lines += [
            "",
            "## Contrastive loss at B = 32k on 8 devices (dense vs chunked)",
            "",
            "From `benchmarks/results/contrastive_memory_cpu.json` "
            f"(`{report['contrastive'][0]['command']}`, {report['contrastive'][0]['date']}): "
            "loss + gradients of the embeddings, batch split over data=8; temporaries per "
            "device.",
            "",
            "| loss | dim | temp/dev (MiB) | vs dense |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r['loss']} | {r['dim']} | {r['temp_bytes'] / MIB:,.1f} | "
                  f"{r['vs_dense']:.3f} |" for r in report["contrastive"]]  # fmt: skip
    missing = [r for r in now if not r.get("compiled", True)]
    if missing:
        lines += ["", f"Not compiled ({len(missing)} of {len(now)} cells; bytes from "
                  "the rules only): " + ", ".join(f"{r['model']} {r['kind']} {r['devices']}"
                                                  for r in missing) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny VLM on 2 and 8 devices")
    parser.add_argument("--models", default="ViT-B-16,ViT-L-14,ViT-H-14,ViT-bigG-14,LLaVA-7B")
    parser.add_argument("--devices", default="8,64,256")
    parser.add_argument("--kinds", default="fsdp,fsdp_tp")
    parser.add_argument("--tp", type=int, default=4, help="model axis of the fsdp_tp meshes")
    parser.add_argument("--per_device_batch", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--remat_model",
        default="ViT-L-14",
        help="also compiled with remat=full on the first device count",
    )
    parser.add_argument(
        "--cells", default="", help="instead of the matrix: model:kind:devices[:remat],..."
    )
    parser.add_argument("--no_scan", action="store_true", help="the blocks as a Python loop")
    parser.add_argument(
        "--compile_all",
        action="store_true",
        help="compile every cell (default: the first kind at the first and last device "
        "counts and the remat cell; the others bytes from the rules only)",
    )
    parser.add_argument(
        "--shapes_only",
        action="store_true",
        help="only the per-device parameter and optimizer bytes (no compile)",
    )
    parser.add_argument(
        "--combine",
        default="",
        help="comma-separated .json reports of earlier runs: their rows, "
        "in order, make this report (nothing is compiled)",
    )
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "scale_cpu"))
    args = parser.parse_args(argv)
    if args.smoke:  # the VLM family covers both towers' code (CLIP image tower, LM)
        args.models, args.devices, args.tp, args.remat_model = "tiny-VLM", "2,8", 2, ""
        args.compile_all = True
        runtime.enable_compilation_cache()
    start = time.perf_counter()
    rows, seconds, commands = [], 0.0, []
    for path in filter(None, args.combine.split(",")):
        part = read_part(path)
        rows += part["rows"]
        seconds += part["total_seconds"]
        commands.append(part["command"])
    cells = {cell(r): r for r in rows}  # a compiled row replaces the shapes-only one
    rows = [r for r in cells.values()]
    devices = [int(d) for d in args.devices.split(",")]
    kinds = args.kinds.split(",")
    common = dict(tp=args.tp, per_device_batch=args.per_device_batch, dtype=args.dtype,
                  scan=not args.no_scan)  # fmt: skip
    cells = []  # (model, kind, devices, remat, compiled)
    ends = (devices[0], devices[-1])
    for name in [] if args.combine or args.cells else args.models.split(","):
        cells += [(name, kind, n, "none", args.compile_all or (kind == kinds[0] and n in ends))
                  for kind in kinds for n in devices]  # fmt: skip
        if name == args.remat_model:
            cells.append((name, kinds[0], devices[0], "full", True))
    for item in filter(None, args.cells.split(",")):
        name, kind, n, *rest = item.split(":")
        cells.append((name, kind, int(n), rest[0] if rest else "none", True))
    for name, kind, n, remat, compiled in cells:
        row = measure(name, kind, n, remat=remat, compile=compiled and not args.shapes_only,
                      **common)  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    command = "python " + " ".join([os.path.relpath(__file__), *sys.argv[1:]])
    report = dict(
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        command=" && ".join(commands + [command]),
        hardware=hardware(), dtype=args.dtype, scan=not args.no_scan, tp=args.tp,
        per_device_batch=args.per_device_batch, rows=rows,
        total_seconds=seconds + time.perf_counter() - start,
        contrastive=contrastive_figure(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results", "contrastive_memory_cpu.json")),
    )  # fmt: skip
    write_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
