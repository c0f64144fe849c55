"""Training input pipeline throughput against the bare PIL ceiling, and its share of step time.

    python benchmarks/data_throughput.py --out benchmarks/results/data_throughput_cpu

Converts `--num_images` photo-like pictures (smooth gradients, detail, shapes and noise at
300x400, so the JPEGs have a photo's entropy) into ArrayRecord shards of 224-px JPEGs, then:
1. ceiling: `decode_rgb` + `train_transform` on the same JPEG bytes in one thread (per core);
2. `TaskBatches` (update, buffer and pretraining pools all read from the shards) for each
   `--threads` setting, the cost of each stage of one element, and a cProfile of the
   synchronous path, to show where time goes beyond the ceiling;
3. the share of a CPU training step spent blocked in `next(batches)`, for a tiny CLIP at 224 px
   on the shards and for the default fif_synth job (tiny CLIP at 32 px).
Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import json
import os
import pstats
import resource
import sys
import time
from concurrent import futures
from importlib import metadata

import grain
import jax
import numpy as np
from absl import flags
from clip_step import hardware  # benchmarks/clip_step.py, next to this script
from PIL import Image, ImageDraw

from fomo_jax import models, sharding
from fomo_jax import params as params_lib
from fomo_jax.continual.loop import finetuning
from fomo_jax.data import fif, fif_synth, mixture, pipeline, records, streams, transforms
from fomo_jax.data.webdataset import WebDatasetSource
from fomo_jax.tokenizer import ByteTokenizer
from fomo_jax.train import optimizer

MIXTURE = {"pretraining": 0.33, "update": 0.34, "buffer": 0.33}


def photo(index: int, _item=None) -> records.Example:
    """A deterministic photo-like picture: flat synthetic images compress and decode too fast."""
    rng = np.random.default_rng([7, index])
    h, w = (300, 400) if rng.uniform() < 0.7 else (400, 300)
    cubic = Image.Resampling.BICUBIC
    smooth = Image.fromarray(rng.uniform(0, 255, (3, 4, 3)).astype(np.uint8)).resize((w, h), cubic)
    detail = rng.uniform(0, 255, (h // 12, w // 12, 3)).astype(np.uint8)
    image = Image.blend(smooth, Image.fromarray(detail).resize((w, h), cubic), 0.25)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 8)):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        box = (x, y, x + rng.uniform(20, 150), y + rng.uniform(20, 150))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.uniform() < 0.5 else draw.rectangle)(box, fill=fill)
    pixels = np.clip(np.asarray(image, np.float32) + rng.normal(0, 4, (h, w, 3)), 0, 255)
    target = index % 100
    text = f"a photo of object {target}, a thing with shapes on a gradient ({index})"
    return records.Example(
        pixels.astype(np.uint8), [text], target, f"object {target}", "photos", str(index), ""
    )


def shards(workdir: str, num: int) -> records.RecordSource:
    source = records.Source(range(num), photo, {"kind": "photos", "num": num}, "photos")
    out = os.path.join(workdir, f"photos_{num}")
    records.convert(source, out, records_per_shard=500)  # resumable: a rerun reuses the shards
    return records.RecordSource(out)


def task_batches(catalogue, update, buffer, replay, batch, steps, size, context, threads):
    """Task 1 of a stream: `batch` examples per step split 0.34/0.33/0.33 over the pools."""
    return pipeline.TaskBatches(
        catalogue=catalogue,
        update_ids=update,
        buffer_ids=buffer,
        pretraining=replay,
        batch_sizes=mixture.pool_batch_sizes(batch, MIXTURE, task=1),
        steps=steps,
        seed=0,
        task=1,
        tokenizer=ByteTokenizer(context),
        image_size=size,
        num_threads=threads,
    )


def shard_batches(rs, batch: int, steps: int, threads: int) -> pipeline.TaskBatches:
    """Every pool from the shards: half the records update, half buffer, all of them replay."""
    ids, half = np.arange(len(rs)), len(rs) // 2
    catalogue = mixture.Catalogue({"photos": rs})
    return task_batches(catalogue, ids[:half], ids[half:], rs, batch, steps, 224, 77, threads)


def timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(wall seconds, process CPU seconds of all threads) of the fastest of `repeats` calls."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def consume(iterator, num_batches: int) -> None:
    """Drop each batch at once, as a training loop does. Holding all of them (8 x 38 MB) makes
    every batch fresh memory, and its page faults cost 11-19% of the rate on the dev machine."""
    for _ in range(num_batches):
        next(iterator)


def ceiling(jpegs: list[bytes], threads: int = 1) -> float:
    """Bare decode + RandomResizedCrop in `threads` threads: the images/s those cores can give."""
    rng = np.random.default_rng(0)

    def work(jpeg: bytes) -> np.ndarray:
        return transforms.train_transform(transforms.decode_rgb(jpeg), rng)

    with futures.ThreadPoolExecutor(threads) as pool:
        mapper = map if threads == 1 else pool.map
        walls = [timed(lambda: list(mapper(work, jpegs)))[0] for _ in range(3)]
    return len(jpegs) / float(np.median(walls))


def mp_dataset(tb: pipeline.TaskBatches, workers: int) -> grain.IterDataset:
    """The same batches built whole in `workers` processes (batch b in worker b % workers)."""
    batches = tb.elements().batch(tb.batch_size, drop_remainder=True, batch_fn=tb._collate)
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return batches.to_iter_dataset(options).mp_prefetch(grain.MultiprocessingOptions(workers))


def pipeline_rate(rs, jpegs, batch: int, setting: str, num_batches: int, cores: int) -> dict:
    """`num_batches` batches after one of warm-up, against ceilings measured just before.

    A shared VM's speed drifts by 10-20% over minutes, so each setting gets its own ceilings.
    `setting` is a num_threads, or "mpN" for N worker processes (`mp_dataset`).
    """
    workers = int(setting.removeprefix("mp"))
    used = min(workers, cores) if workers else 1
    top, bare = ceiling(jpegs), ceiling(jpegs, used)
    tb = shard_batches(rs, batch, num_batches + 1, 0 if setting.startswith("mp") else workers)
    iterator = iter(mp_dataset(tb, workers) if setting.startswith("mp") else tb.dataset())
    next(iterator)  # warm-up: thread pool or processes, shard readers, full prefetch buffers
    wall, cpu = timed(lambda: consume(iterator, num_batches))
    iterator.close()  # joins worker processes, so their CPU time counts as ours
    images = num_batches * batch
    return dict(
        setting=setting,
        cores_used=used,
        ceiling=top,
        bare_pil_same_cores=bare,
        images_per_s=images / wall,
        per_core_vs_ceiling=images / wall / used / top,
        vs_bare_pil_same_cores=images / wall / bare,
        # worker processes' CPU time is not this process's
        per_cpu_s_vs_ceiling=None if setting.startswith("mp") else images / cpu / top,
    )


def stage_costs(rs, batch: int) -> dict:
    """Microseconds per element of each pipeline stage run alone in this thread (best of 3)."""
    tb, rng = shard_batches(rs, batch, 4, 0), np.random.default_rng(0)
    raw_source = grain.sources.ArrayRecordDataSource(rs.files)
    idx = [tb.locate(j)[1] for j in range(batch)]
    raws = [raw_source[i] for i in idx]
    items = [records.unpack_record(r) for r in raws]
    pics = [transforms.decode_rgb(e["image"]) for e in items]
    crops = [transforms.train_transform(p, rng, 224) for p in pics]
    texts = [fif.choose_caption(e["captions"], rng) for e in items]
    stages = {
        "sampler (`TaskBatches.locate`)": lambda: [tb.locate(j) for j in range(batch)],
        "ArrayRecord read": lambda: [raw_source[i] for i in idx],
        "msgpack unpack": lambda: [records.unpack_record(r) for r in raws],
        "JPEG decode (`decode_rgb`)": lambda: [transforms.decode_rgb(e["image"]) for e in items],
        "crop + bicubic resize (`train_transform`)": lambda: [
            transforms.train_transform(p, rng, 224) for p in pics
        ],
        "caption choice": lambda: [fif.choose_caption(e["captions"], rng) for e in items],
        "tokenize (ByteTokenizer(77), per batch)": lambda: tb.tokenizer(texts),
        "`np.stack` of the batch": lambda: np.stack(crops),
    }
    iterator = iter(tb.dataset())
    next(iterator)
    whole = {
        # TaskBatches' own per-element functions in a plain loop: the pipeline without grain.
        "plain loop": lambda: tb._collate([tb._augment(tb._load(j), rng) for j in range(batch)]),
        "grain": lambda: next(iterator),  # the synchronous pipeline (num_threads=0)
    }
    stage_us = {name: 1e6 * timed(fn, 3)[0] / batch for name, fn in stages.items()}
    whole_us = {name: 1e6 * timed(fn, 3)[0] / batch for name, fn in whole.items()}
    return dict(stages=stage_us, stages_sum=sum(stage_us.values()), **whole_us)


def profile_sync(rs, batch: int, num_batches: int = 2, top: int = 12) -> list[dict]:
    """cProfile of the synchronous pipeline: the functions with the most own time per element."""
    iterator = iter(shard_batches(rs, batch, num_batches + 1, 0).dataset())
    next(iterator)
    profiler = cProfile.Profile()
    profiler.runcall(consume, iterator, num_batches)
    n = num_batches * batch
    rows = [
        dict(function=f"{os.path.basename(f)}:{name}", calls=nc / n, own_us=1e6 * tt / n,
             cumulative_us=1e6 * ct / n)
        for (f, _, name), (_, nc, tt, ct, _) in pstats.Stats(profiler).stats.items()
    ]  # fmt: skip
    return sorted(rows, key=lambda r: -r["own_us"])[:top]


def data_wait(cfg, batches: pipeline.TaskBatches, steps: int, warmup: int = 3) -> dict:
    """Run real train steps fed by `batches`: time blocked in next() against the whole step."""
    graphdef, params = params_lib.split(models.create_model(cfg))
    tx, mesh = optimizer.adamw(), sharding.make_mesh()
    step, state = finetuning(graphdef, tx, mesh, params)
    iterator, wait, total = iter(batches.dataset()), 0.0, 0.0
    for i in range(warmup + steps):
        start = time.perf_counter()
        batch = next(iterator)
        feed = {"images": batch["images"], "token_ids": batch["token_ids"]}
        got = time.perf_counter()
        state, metrics = step(state, feed, 1e-4)
        jax.block_until_ready(metrics["loss"])
        if i >= warmup:
            wait, total = wait + got - start, total + time.perf_counter() - start
    alone = []  # the dataset is exhausted and its threads idle: the step alone, on the last batch
    for _ in range(10):
        start = time.perf_counter()
        state, metrics = step(state, feed, 1e-4)
        jax.block_until_ready(metrics["loss"])
        alone.append(time.perf_counter() - start)
    return dict(
        batch=batches.batch_size,
        image_size=cfg.vision.image_size,
        num_threads=batches.read_options.num_threads,
        step_s=total / steps,
        wait_s=wait / steps,
        data_wait_share=wait / total,
        step_alone_s=float(np.median(alone)),
    )


def fif_synth_batches(root: str, batch: int, steps: int, threads: int) -> pipeline.TaskBatches:
    """Task 1 of the default fif_synth job, wired as in benchmarks/fif_synth_effects.py."""
    fif_synth.generate(root)  # reuses an existing benchmark made with the default parameters
    datasets, info = fif_synth.load_datasets(root), os.path.join(root, "00_info")
    splits = {
        k: pipeline.SplitSource(fif.load_split(root, k, "train", datasets=datasets))
        for k, d in datasets.items()
        if d.role == "adaptation"
    }
    catalogue = mixture.Catalogue(splits)
    stream = streams.load_stream(
        os.path.join(root, "streams", "random_sequence_1.json"), info, datasets=datasets
    )
    targets = streams.parse_targets(stream, info, datasets=datasets)
    tasks = streams.chunk([(t.dataset, t.target) for t in targets], 4)
    update, buffer = mixture.task_pools(catalogue, tasks, 1)
    replay = WebDatasetSource(os.path.join(root, "pretraining"))
    return task_batches(catalogue, update, buffer, replay, batch, steps, 32, 48, threads)


def busy_cpu_seconds() -> float:
    """CPU-seconds all processes have used (Linux /proc/stat): with this process's own, it
    tells whether another job shared the machine during the run and skewed the numbers."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def own_cpu_seconds() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows] + [""]


def markdown(r: dict) -> str:
    a, hw, c = r["args"], r["hardware"], r["costs_us"]
    lines = [
        f"# Input pipeline throughput ({r['date']})",
        "",
        f"Hardware: CPU {hw['cpu']} x {hw['cpu_count']} cores, no accelerator; jax "
        f"{hw['jax']}, grain {r['versions']['grain']}, Pillow {r['versions']['pillow']}.  ",
        f"Command: `{r['command']}`.  ",
        f"Other processes used {r['other_processes_cpu_s']:.0f} CPU-seconds during the run "
        "(0 on a quiet machine).",
        "",
        f"Data: {r['num_images']} photo-like images in ArrayRecord shards of 224-px JPEGs "
        f"(quality 95, 4:4:4), {r['mean_jpeg_kb']:.1f} KB on average. Batches of {a['batch']} "
        "at 224 px, update/buffer/pretraining 0.34/0.33/0.33, all three pools read from the "
        "shards, captions tokenized with ByteTokenizer(77).",
        "",
        "Each row has its own ceilings, measured just before it (a shared VM's speed drifts).",
        "",
    ]
    lines += _table(
        ["num_threads", "cores used", "ceiling, 1 core", "bare PIL, same cores", "images/s",
         "images/s per core", "per core / ceiling", "/ bare PIL, same cores",
         "per CPU-second / ceiling"],
        [[p["setting"], p["cores_used"], f"{p['ceiling']:.0f}", f"{p['bare_pil_same_cores']:.0f}",
          f"{p['images_per_s']:.0f}", f"{p['images_per_s'] / p['cores_used']:.0f}",
          f"**{p['per_core_vs_ceiling']:.0%}**", f"{p['vs_bare_pil_same_cores']:.0%}",
          "n/a" if p["per_cpu_s_vs_ceiling"] is None else f"{p['per_cpu_s_vs_ceiling']:.0%}"]
         for p in r["pipeline"]],
    )  # fmt: skip
    lines += [
        "*ceiling, 1 core*: bare `decode_rgb` + `train_transform` on the same JPEG bytes in "
        "memory, one thread. *bare PIL, same cores*: the same in a pool of that many threads, "
        "what those cores give without the pipeline. *cores used* = min(num_threads, cores), "
        "and 1 for num_threads=0 (grain then works in the calling thread: no thread pool); "
        "*images/s per core* = images/s / cores used. With threads the calling thread also "
        "collates and tokenizes each batch, so *per core* may exceed what one core does; *per "
        "CPU-second* divides by the CPU time of all threads instead. *mp2*: not the library's "
        "path but a proposed one, the same batches built whole in 2 grain worker processes "
        "(`mp_dataset` in the script).",
        "",
        "## One element, stage by stage (one thread, best of 3)",
        "",
    ]
    stages = [[k, f"{v:.1f}"] for k, v in c["stages"].items()]
    stages += [
        ["**sum of the stages**", f"**{c['stages_sum']:.1f}**"],
        ["the same in `TaskBatches`' functions, plain loop", f"{c['plain loop']:.1f}"],
        ["the synchronous grain pipeline (num_threads=0)", f"{c['grain']:.1f}"],
        ["glue: plain loop - sum of stages", f"{c['plain loop'] - c['stages_sum']:.1f}"],
        ["grain: pipeline - plain loop", f"{c['grain'] - c['plain loop']:.1f}"],
    ]
    lines += _table(["stage", "µs per element"], stages)
    lines += ["## cProfile of the synchronous pipeline (top own time)", ""]
    lines += _table(
        ["function", "calls per element", "own µs per element", "cumulative µs per element"],
        [[f"`{p['function']}`", f"{p['calls']:.3g}", f"{p['own_us']:.1f}",
          f"{p['cumulative_us']:.1f}"] for p in r["profile"]],
    )  # fmt: skip
    lines += [
        "## Data-wait share of a CPU training run",
        "",
        f"{a['steps']} real jitted train steps after 3 of warm-up, each blocked on its loss; "
        "wait = time in `next(batches)`. *Step alone* repeats the step on the last batch with "
        "the pipeline idle: the difference to *step* is the pipeline's threads competing with "
        "XLA for the cores, a cost the wait share does not show. At 224 px one batch costs "
        f"{a['batch'] * c['grain'] / 1e6:.2f} CPU-seconds to produce (synchronous rate above).",
        "",
    ]
    lines += _table(
        ["run", "batch", "px", "num_threads", "step (s)", "wait (s)", "data-wait share",
         "step alone (s)"],
        [[t["name"], t["batch"], t["image_size"], t["num_threads"], f"{t['step_s']:.3f}",
          f"{t['wait_s']:.3f}", f"{t['data_wait_share']:.1%}", f"{t['step_alone_s']:.3f}"]
         for t in r["training"]],
    )  # fmt: skip
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    parser.add_argument("--threads", default="0,1,2,4,8,mp2", help="num_threads; mpN: processes")
    parser.add_argument("--train_threads", default="8,2", help="8: the library default")
    parser.add_argument("--fif_synth", default="/tmp/fif_synth", help="'' skips that run")
    parser.add_argument("--workdir", default="/tmp/data_throughput", help="for the shards")
    parser.add_argument("--out", default="benchmarks/results/data_throughput_cpu")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain and array_record read absl flags

    busy, own = busy_cpu_seconds(), own_cpu_seconds()
    rs = shards(args.workdir, args.num_images)
    jpegs = [rs[i]["image"] for i in range(len(rs))]
    report = dict(
        date=datetime.date.today().isoformat(),
        command="python " + " ".join(sys.argv),
        hardware=hardware(),
        versions={k: metadata.version(k) for k in ("grain", "pillow")},
        args=vars(args),
        num_images=len(rs),
        mean_jpeg_kb=float(np.mean([len(j) for j in jpegs])) / 1e3,
        pipeline=[],
    )
    for setting in args.threads.split(","):
        cores, ceiling_set = os.cpu_count() or 1, jpegs[:256]
        row = pipeline_rate(rs, ceiling_set, args.batch, setting, args.batches, cores)
        report["pipeline"].append(row)
        print(json.dumps(row), flush=True)
    report["costs_us"] = stage_costs(rs, args.batch)
    report["profile"] = profile_sync(rs, args.batch)

    tiny, steps, report["training"] = models.get_config("tiny"), args.steps + 3, []
    vision = dataclasses.replace(tiny.vision, image_size=224, patch_size=32)
    cfg224 = tiny.replace(vision=vision, text=dataclasses.replace(tiny.text, context_length=77))
    cfg32 = tiny.replace(text=dataclasses.replace(tiny.text, context_length=48))
    for threads in map(int, args.train_threads.split(",")):
        batches = shard_batches(rs, args.batch, steps, threads)
        run = data_wait(cfg224, batches, args.steps)
        report["training"].append(dict(name="tiny CLIP, 224-px shards", **run))
        if args.fif_synth:  # the default job: 128 per batch, 40-px JPEG files and tar shards
            batches = fif_synth_batches(args.fif_synth, 128, steps, threads)
            run = data_wait(cfg32, batches, args.steps)
            report["training"].append(dict(name="tiny CLIP, fif_synth", **run))
    report["other_processes_cpu_s"] = busy_cpu_seconds() - busy - (own_cpu_seconds() - own)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
