"""Merge functions (fomo_jax.merging) on ViT-B/16-sized CLIP trees: time and memory.

    python benchmarks/merging.py --out benchmarks/results/merging_cpu

Part 1 — every merge of two models by `merging.merge` (leaf by leaf, one compiled program per
leaf shape and configuration) on random trees with the exact parameter shapes of the ViT-B/16
CLIP (both towers and `logit_scale`, 149.6M parameters, from `nnx.eval_shape`, filled with
random values: θ0 ~ N(0, 0.02²), θ_i = θ0 + N(0, 0.001²)). The first call (compiling the leaf
programs, then merging) is timed apart from `--repeats` further runs. Each merge runs in its own
subprocess so that its peak RSS (VmHWM, reset after the trees are built and again before the
runs) is its own; the increase includes the result (one model).

Part 2 — `merging.streamed` over `--streamed_models` (20) such models written as per-leaf .npy
files (read back through memmaps, chunk by chunk) for interpolation, task arithmetic, TIES
(global trim: two histogram passes for the exact per-model thresholds, one for the majority
sign, one to merge) and MagMax, with the peak RSS increase (from before θ0 is loaded, so it
includes θ0 and the result) relative to one model's size.

Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from fomo_jax import merging, models
from fomo_jax import params as params_lib

# (label, merge name, kwargs): the defaults of spec §9 unless stated.
IN_MEMORY = [
    ("interpolation", "interpolation", {}),
    ("slerp", "slerp", {}),
    ("task_arithmetic", "task_arithmetic", {"scale": 0.3}),
    ("ties (global trim)", "ties", {"prune_fraction": 0.7}),
    ("ties (per-leaf trim)", "ties", {"prune_fraction": 0.7, "trim": "per_leaf"}),
    ("ties + LiNeS", "ties", {"prune_fraction": 0.2, "lines": True}),
    ("dare_ties", "dare_ties", {"prune_fraction": 0.7}),
    ("breadcrumbs", "breadcrumbs", {"prune_fraction": 0.7, "top_prune_fraction": 0.01}),
    ("magmax", "magmax", {}),
    ("random", "random", {}),
    ("model_stock", "model_stock", {}),
    ("tall_masks (κ=2)", "tall_masks", {"threshold": 2}),
]
STREAMED = [
    ("interpolation", "interpolation", {}),
    ("task_arithmetic", "task_arithmetic", {"scale": 0.3}),
    ("ties (global trim)", "ties", {"prune_fraction": 0.2}),
    ("magmax", "magmax", {}),
]


def memory_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def reset_peak() -> None:
    """Reset VmHWM (and ru_maxrss) to the current RSS (Linux clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def shapes(model_name: str):
    cfg = models.get_config(model_name)
    from flax import nnx

    abstract = nnx.eval_shape(lambda: models.CLIP(cfg, rngs=nnx.Rngs(0)))
    return params_lib.split(abstract)[1]


def tree_bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def random_trees(model_name: str, n: int, seed: int = 0):
    """θ0 and n models θ_i = θ0 + τ_i as jax arrays (generated leaf by leaf on device)."""
    abstract = shapes(model_name)

    @jax.jit
    def draw(key, base):
        return base + 1e-3 * jax.random.normal(key, base.shape, base.dtype)

    flat = params_lib.flatten(abstract)
    key = jax.random.key(seed)
    base = {
        p: 0.02 * jax.random.normal(jax.random.fold_in(key, j), s.shape, s.dtype)
        for j, (p, s) in enumerate(flat.items())
    }
    trees = [
        params_lib.unflatten(
            {
                p: draw(jax.random.fold_in(jax.random.fold_in(key, 1000 + i), j), b)
                for j, (p, b) in enumerate(base.items())
            }
        )
        for i in range(n)
    ]
    return params_lib.unflatten(base), trees


# ----------------------------------------------------------------------------- part 1 (worker)


def run_in_memory(model_name: str, index: int, repeats: int) -> dict:
    label, name, kwargs = IN_MEMORY[index]
    base, trees = random_trees(model_name, 2)
    jax.block_until_ready((base, trees))
    key = jax.random.key(1)

    def call():
        return jax.block_until_ready(merging.merge(name, base, trees, key=key, **kwargs))

    # First call: compiles the leaf programs (one per leaf shape and configuration) and runs.
    reset_peak()
    rss0 = memory_status()["VmRSS"]
    t = time.perf_counter()
    out = call()
    first_s = time.perf_counter() - t
    first_peak = memory_status()["VmHWM"] - rss0
    del out
    reset_peak()
    rss0 = memory_status()["VmRSS"]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t)
        del out
    peak = memory_status()["VmHWM"]
    model_bytes = tree_bytes(base)
    return {
        "label": label,
        "merge": name,
        "kwargs": {k: v for k, v in kwargs.items()},
        "first_call_seconds": first_s,
        "first_call_peak_rss_increase_bytes": first_peak,
        "run_seconds": times,
        "run_seconds_min": min(times),
        "peak_rss_increase_bytes": peak - rss0,
        "peak_rss_increase_models": (peak - rss0) / model_bytes,
        "model_bytes": model_bytes,
    }


# ----------------------------------------------------------------------------- part 2


def write_models(model_name: str, n: int, directory: str, seed: int = 0) -> dict:
    """θ0 and n models as per-leaf .npy files under directory/{base,m00,…} (numpy RNG, one
    leaf at a time)."""
    abstract = params_lib.flatten(shapes(model_name))
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    base = {}
    for path, s in abstract.items():
        base[path] = (0.02 * rng.standard_normal(s.shape, np.float32)).astype(np.float32)
    merging.save_npy(params_lib.unflatten(base), os.path.join(directory, "base"))
    for i in range(n):
        model = {
            p: b + np.float32(1e-3) * rng.standard_normal(b.shape, np.float32)
            for p, b in base.items()
        }
        merging.save_npy(params_lib.unflatten(model), os.path.join(directory, f"m{i:02d}"))
        del model
    return {"write_seconds": time.perf_counter() - t}


def run_streamed(model_name: str, index: int, n: int, directory: str, chunk: int) -> dict:
    label, name, kwargs = STREAMED[index]
    abstract = shapes(model_name)
    read_base = merging.npy_reader([os.path.join(directory, "base")])
    # Compile the chunk kernels on a tiny stand-in first? No: their compile time is part of the
    # cost of a streamed merge and is included below.
    reset_peak()
    rss0 = memory_status()["VmRSS"]
    t = time.perf_counter()
    flat = {p: np.array(read_base(0, p)) for p in params_lib.flatten(abstract)}
    base = params_lib.unflatten(flat)
    load_s = time.perf_counter() - t
    read = merging.npy_reader([os.path.join(directory, f"m{i:02d}") for i in range(n)])
    t = time.perf_counter()
    out = merging.streamed(name, base, read, n, chunk_size=chunk, **kwargs)
    merge_s = time.perf_counter() - t
    peak = memory_status()["VmHWM"]
    model_bytes = tree_bytes(abstract)
    finite = all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(out))
    return {
        "label": label,
        "merge": name,
        "kwargs": kwargs,
        "models": n,
        "chunk_entries": chunk,
        "base_load_seconds": load_s,
        "merge_seconds": merge_s,
        "peak_rss_increase_bytes": peak - rss0,
        "peak_rss_increase_models": (peak - rss0) / model_bytes,
        "model_bytes": model_bytes,
        "result_finite": finite,
    }


# ----------------------------------------------------------------------------- driver


def hardware() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if "Model name" in ln), cpu)
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "platform": jax.devices()[0].platform,
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "jax": jax.__version__,
    }


def worker(args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(report) -> str:
    hw = report["hardware"]
    gib = 2**30
    lines = [
        f"# Merge functions ({report['date']})",
        "",
        f"Hardware: {hw['cpu']} x {hw['nproc']} cores, {hw['memory_gib']} GiB RAM "
        f"({hw['platform']}), jax {hw['jax']}.  ",
        f"Command: `{report['command']}`",
        "",
        f"## Two {report['model']} CLIPs, merged leaf by leaf",
        "",
        f"Trees: the full {report['model']} CLIP parameter tree (both towers and "
        f"`logit_scale`, {report['params'] / 1e6:.1f}M float32 parameters, "
        f"{report['model_bytes'] / gib:.2f} GiB per model); θ0 and two models are resident "
        "(3 models) before each merge. `merging.merge` runs each leaf's arithmetic as one "
        "compiled program (cached per leaf shape and configuration); the TIES family's global "
        "trim (over the whole tree given, here both towers; the runner merges one tower at a "
        "time) takes two 16-bit histogram passes over the leaves for the exact thresholds, one "
        "for the majority sign and one to merge. Peak RSS increases are measured from just "
        "before the first call (compiling the leaf programs, then merging) and from just "
        "before the runs, with the high-water mark reset in between; both include the result "
        "(1 model; after the first call the allocator reuses freed pages, so the runs' increase "
        f"can be below it). Run time is the fastest of {report['repeats']}.",
        "",
        "| merge | settings | first call (s) | first call peak RSS increase (GiB) | × one model "
        "| run (s) | run peak RSS increase (GiB) | × one model "
        "| before: run (s) | before: × one model |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    previous = report.get("previous", {}).get("in_memory", {})
    for r in report["in_memory"]:
        settings = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items()) or "defaults"
        old = previous.get(r["label"])
        before = (
            f"{old['run_seconds_min']:.2f} | {old['peak_rss_increase_models']:.2f}"
            if old
            else " | "
        )
        lines.append(
            f"| {r['label']} | {settings} | {r['first_call_seconds']:.1f} | "
            f"{r['first_call_peak_rss_increase_bytes'] / gib:.2f} | "
            f"{r['first_call_peak_rss_increase_bytes'] / r['model_bytes']:.2f} | "
            f"{r['run_seconds_min']:.2f} | "
            f"{r['peak_rss_increase_bytes'] / gib:.2f} | {r['peak_rss_increase_models']:.2f} | "
            f"{before} |"
        )
    if previous:
        was = report["previous"]
        lines += [
            "",
            f"Before: the same measurement on {was['date']} ({was['hardware']['cpu']} x "
            f"{was['hardware']['nproc']} cores) with the merges compiled as whole-tree programs "
            "(the global threshold a 32-step bisection over all leaves at once, DARE's draws "
            "materialised).",
        ]
    s = report["streamed"]
    lines += [
        "",
        f"## {s['models']} {report['model']} CLIPs, streamed leaf by leaf",
        "",
        f"`merging.streamed` over {s['models']} models stored as per-leaf .npy files "
        f"({s['models'] * report['model_bytes'] / gib:.1f} GiB on local disk, written in "
        f"{s['write_seconds']:.0f} s) read through memmaps in chunks of "
        f"{s['chunk_entries']:,} entries. Peak RSS increase is measured from before θ0 is "
        "loaded, so it includes θ0 (1 model) and the result (1 model); the page cache of "
        "the files is not process memory. Times include compiling the chunk kernels.",
        "",
        "| merge | settings | passes over the models | time (s) | peak RSS increase (GiB) "
        "| × one model |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["runs"]:
        settings = ", ".join(f"{k}={v}" for k, v in r["kwargs"].items()) or "uniform"
        passes = 4 if r["merge"] == "ties" else 1
        lines.append(
            f"| {r['label']} | {settings} | {passes} | {r['merge_seconds']:.1f} | "
            f"{r['peak_rss_increase_bytes'] / gib:.2f} | {r['peak_rss_increase_models']:.2f} |"
        )
    load = report.get("load_average", {})
    lines += [
        "",
        "Notes:",
        "",
        f"- The {s['models']} models' files fit in this machine's page cache, so the streamed "
        "times are reads from memory. From cold storage (this disk reads about 1.1 GB/s with "
        "O_DIRECT) one pass over 20 models takes at least ~10 s more, and TIES makes 4 passes.",
        *(
            [
                f"- The streamed results are from the run of {s['date']} on the machine of "
                "'Before' (`streamed` is unchanged)."
            ]
            if s.get("date")
            else []
        ),
        "- First-call time is mostly compiling the leaf programs: one per distinct leaf "
        "shape and configuration (a ViT-B/16 tree has few distinct shapes), kept by the "
        "persistent compilation cache. DARE remakes its uniform draws from the leaf keys in "
        "each of its four passes instead of holding them (they would be one model per merged "
        "model).",
        f"- The machine was shared with other jobs (1-minute load average "
        f"{load.get('start', float('nan')):.1f} at the start, "
        f"{load.get('end', float('nan')):.1f} at the end on 2 cores), so times are noisy; "
        "compile times especially.",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--streamed_models", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=1 << 18)
    parser.add_argument("--only", default="", help="comma-separated in-memory labels to run")
    parser.add_argument("--skip_streamed", action="store_true")
    parser.add_argument(
        "--reuse_streamed",
        action="store_true",
        help="skip part 2 and keep the streamed results of the existing <out>.json",
    )
    parser.add_argument("--workdir", default=None, help="where the streamed models are written")
    parser.add_argument("--out", default="benchmarks/results/merging_cpu")
    # Internal: one measurement in this process.
    parser.add_argument("--in_memory_worker", type=int, default=None)
    parser.add_argument("--streamed_worker", type=int, default=None)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--render", default=None, help="rewrite <out>.md from this JSON")
    args = parser.parse_args()

    if args.render:
        with open(args.render) as f:
            report = json.load(f)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(report))
        return
    if args.in_memory_worker is not None:
        print(json.dumps(run_in_memory(args.model, args.in_memory_worker, args.repeats)))
        return
    if args.streamed_worker is not None:
        result = run_streamed(
            args.model, args.streamed_worker, args.streamed_models, args.dir, args.chunk
        )
        print(json.dumps(result))
        return

    abstract = shapes(args.model)
    report = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "hardware": hardware(),
        "model": args.model,
        "repeats": args.repeats,
        "load_average": {"start": os.getloadavg()[0]},
        "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)),
        "model_bytes": tree_bytes(abstract),
        "in_memory": [],
        "notes": [],
    }
    if os.path.exists(args.out + ".json"):  # the last results, shown as "before"
        with open(args.out + ".json") as f:
            last = json.load(f)
        report["previous"] = {
            "date": last["date"],
            "hardware": last["hardware"],
            "in_memory": {
                r["label"]: {k: r[k] for k in ("run_seconds_min", "peak_rss_increase_models")}
                for r in last["in_memory"]
            },
        }
        if args.reuse_streamed and "streamed" in last:
            report["streamed"] = {"date": last["date"], **last["streamed"]}
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    common = ["--model", args.model]
    for index, (label, _, _) in enumerate(IN_MEMORY):
        if only and label not in only:
            continue
        print(f"in memory: {label}", file=sys.stderr, flush=True)
        result = worker([*common, "--repeats", str(args.repeats), "--in_memory_worker", str(index)])
        print(json.dumps(result), file=sys.stderr, flush=True)
        report["in_memory"].append(result)

    if not (args.skip_streamed or args.reuse_streamed):
        directory = tempfile.mkdtemp(prefix="merging_bench_", dir=args.workdir)
        try:
            need = (args.streamed_models + 1) * report["model_bytes"]
            free = shutil.disk_usage(directory).free
            if free < 1.2 * need:
                raise SystemExit(
                    f"{directory}: {free / 2**30:.1f} GiB free, need {need / 2**30:.1f}"
                )
            print(f"writing {args.streamed_models} models to {directory}", file=sys.stderr)
            streamed = {
                "models": args.streamed_models,
                "chunk_entries": args.chunk,
                **write_models(args.model, args.streamed_models, directory),
                "runs": [],
            }
            for index, (label, _, _) in enumerate(STREAMED):
                print(f"streamed: {label}", file=sys.stderr, flush=True)
                result = worker(
                    [
                        *common,
                        "--streamed_models",
                        str(args.streamed_models),
                        "--chunk",
                        str(args.chunk),
                        "--dir",
                        directory,
                        "--streamed_worker",
                        str(index),
                    ]
                )
                print(json.dumps(result), file=sys.stderr, flush=True)
                streamed["runs"].append(result)
            report["streamed"] = streamed
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    report["load_average"]["end"] = os.getloadavg()[0]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    if "streamed" in report:
        with open(args.out + ".md", "w") as f:
            f.write(markdown(report))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
