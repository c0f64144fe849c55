"""Is the default job input-bound? θ0's training loop fed by its pipeline, and by batches that
cost nothing, in alternation.

    python benchmarks/input_bound.py --out benchmarks/results/input_bound_cpu

The θ0 job of the default config (`configs/fif_synth.py`: batch 128, training images decoded
once, whole batches per grain item) runs `--steps` steps through the one training loop, in
`--rounds` rounds of two runs each: one fed by the real pipeline, one by 8 of the pipeline's
batches replayed from memory (no host work per batch). If the pipeline held the steps back,
the replayed run would be the faster. For each run: samples/s over the log windows after the
first (compilation excluded), the share of the time spent getting batches
(`data_wait_fraction`) and the idle part of it, with no step left running
(`data_wait_idle_fraction`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from clip_step import hardware, write_report  # noqa: E402
from default_job import data_wait  # noqa: E402

from fomo_jax import families, sharding  # noqa: E402
from fomo_jax import params as params_lib  # noqa: E402
from fomo_jax.configs import fif_synth  # noqa: E402
from fomo_jax.continual import loop as loop_lib  # noqa: E402
from fomo_jax.continual import runner, theta0  # noqa: E402

LOG_EVERY = 25


class Replayed:
    """The first `count` batches of `batches`, replayed from memory for every step."""

    def __init__(self, batches, count: int = 8):
        self.batch_size, self.sizes = batches.batch_size, batches.sizes
        iterator = iter(batches.dataset(0))
        self.cached = [next(iterator) for _ in range(count)]

    def dataset(self, start_step: int):
        for step in range(start_step, 10**9):
            yield self.cached[step % len(self.cached)]


def one_run(config, data, feed: str, steps: int, workdir: str) -> dict:
    family = families.get("clip")
    model_config = family.model_config(config)
    shutil.rmtree(workdir, ignore_errors=True)
    job = theta0.pretraining_job(
        workdir, family, model_config, data.tokenizer, data.pool, steps=steps,
        batch_size=config.theta0.batch_size, seed=config.seed,
        mesh=sharding.make_mesh(**config.mesh), learning_rates=[config.theta0.lr] * steps,
        optimizer_config=theta0.adamw_config(config.theta0.weight_decay),
        log_every=LOG_EVERY, checkpoint_every=0,
        num_threads=config.data.num_threads, whole_batches=data.whole_batches,
    )  # fmt: skip
    if feed == "replayed":
        replayed = Replayed(job.batches(0, None))
        job = dataclasses.replace(job, batches=lambda task, record: replayed)
    model = family.init_model(model_config, seed=config.seed)
    loop_lib.train(job, params_lib.split(model)[1])
    wait = data_wait(os.path.join(workdir, "metrics.jsonl"), config.theta0.batch_size,
                     skip_windows=1)  # fmt: skip
    return dict(
        feed=feed,
        samples_per_second=wait["samples"] / wait["logged_seconds"],
        data_wait_share=wait["share"],
        idle_share=wait["idle_share"],
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/input_bound_cpu")
    parser.add_argument("--data", default=None, help="fif_synth root (default: a new temp dir)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="input_bound_")
    config = fif_synth.get_config()
    config.data.root = args.data or os.path.join(scratch, "data")
    data = runner.prepare_data(config)  # generates fif_synth if missing
    runs = []
    for r in range(args.rounds):
        for feed in ("pipeline", "replayed"):
            run = one_run(config, data, feed, args.steps, os.path.join(scratch, feed))
            runs.append(dict(run, round=r))
            print(json.dumps(runs[-1]), flush=True)
    summary = {}
    for feed in ("pipeline", "replayed"):
        mine = [x for x in runs if x["feed"] == feed]
        keys = ("samples_per_second", "data_wait_share", "idle_share")
        summary[feed] = {key: float(np.median([x[key] for x in mine])) for key in keys}
    report = dict(
        date=datetime.date.today().isoformat(),
        command="python " + " ".join(sys.argv),
        hardware=hardware(),
        steps=args.steps,
        batch_size=config.theta0.batch_size,
        runs=runs,
        median=summary,
        pipeline_over_replayed=summary["pipeline"]["samples_per_second"]
        / summary["replayed"]["samples_per_second"],
    )
    write_report(args.out, report, markdown(report))
    shutil.rmtree(scratch, ignore_errors=True)


def markdown(r) -> str:
    hw = r["hardware"]
    lines = [
        f"# Is the default job input-bound? ({r['date']})",
        "",
        f"Hardware: CPU {hw['cpu']} x {hw['cpu_count']} cores, no accelerator; jax {hw['jax']}.  ",
        f"Command: `{r['command']}`.",
        "",
        f"θ0's job of the default config ({r['steps']} steps of batch {r['batch_size']}), fed "
        "by its pipeline or by 8 of its batches replayed from memory, in alternation. "
        "Samples/s over the log windows after the first; data wait: the share of the time spent "
        "getting batches; idle: the part of it with no step left running (an upper bound).",
        "",
        "| round | feed | samples/s | data wait | idle |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {x['round']} | {x['feed']} | {x['samples_per_second']:.0f} | "
        f"{100 * x['data_wait_share']:.1f}% | {100 * x['idle_share']:.1f}% |"
        for x in r["runs"]
    ]
    lines += [
        f"| median | {feed} | {m['samples_per_second']:.0f} | {100 * m['data_wait_share']:.1f}% "
        f"| {100 * m['idle_share']:.1f}% |"
        for feed, m in r["median"].items()
    ]
    lines += [
        "",
        f"**Pipeline / replayed throughput: {r['pipeline_over_replayed']:.2f}** (1.00: the "
        "pipeline costs the training loop nothing).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
