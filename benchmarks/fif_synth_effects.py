"""Does fif_synth show continual-learning effects? Pretrain θ0, then fine-tune over the stream.

Measures what decides whether the synthetic benchmark can show anything (issue 3):
θ0's zero-shot accuracy on the evaluation-only sets (should be well above chance) and on the
adaptation sets (near chance), and what plain fine-tuning over the stream does to A_KA (should
rise by tens of points) and A_ZS (should visibly drop).

This is a self-contained measurement on the data layer and the train step, not the continual
runner (which owns evaluation subsets, checkpoints and methods).

python benchmarks/fif_synth_effects.py   # writes benchmarks/results/fif_synth_effects.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import jax
import numpy as np
import optax
from absl import flags

from fomo_jax import evaluate as evaluate_lib
from fomo_jax import models, runtime, sharding
from fomo_jax import params as params_lib
from fomo_jax.continual.loop import finetuning
from fomo_jax.data import fif, fif_synth, mixture, pipeline, streams, webdataset
from fomo_jax.tokenizer import ByteTokenizer
from fomo_jax.train import optimizer
from fomo_jax.train import step as step_lib


def evaluate(model, root, datasets, tokenizer, image_size):
    scores = evaluate_lib.evaluate_datasets(model, root, datasets, tokenizer, image_size)
    return dict(evaluate_lib.summarize(scores, datasets), per_dataset=scores)


def warmup_cosine(lr, steps):
    warmup = max(1, int(np.ceil(0.1 * steps)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 1e-3)
    return [float(schedule(s)) for s in range(steps)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/fif_synth_effects")
    parser.add_argument("--data", default="runs/fif_synth_data")
    parser.add_argument("--pretrain_steps", type=int, default=2000)
    parser.add_argument("--pretrain_lr", type=float, default=2e-3)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps_per_task", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--mixtures", default="0.33,0.34,0.33;0,1,0", help="pretraining,update,buffer; ..."
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    runtime.enable_compilation_cache()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

    # Generation time as recorded when the data was made (it is reused when present).
    generate_seconds = fif_synth.generate(args.data, seed=args.seed)["seconds"]
    root, datasets = args.data, fif_synth.load_datasets(args.data)

    cfg = models.get_config("tiny")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, context_length=48))
    image_size = cfg.vision.image_size
    tokenizer = ByteTokenizer(context_length=48)
    model = models.create_model(cfg, seed=args.seed)
    graphdef, params = params_lib.split(model)
    tx = optimizer.adamw(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.2, clip_norm=1.0)
    mesh = sharding.make_mesh()
    step_fn, state = finetuning(graphdef, tx, mesh, params)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)

    adaptation = [k for k, d in datasets.items() if d.role == "adaptation"]
    catalogue = mixture.Catalogue(
        {k: pipeline.SplitSource(fif.load_split(root, k, "train", datasets=datasets))
         for k in adaptation}
    )  # fmt: skip
    pool = webdataset.WebDatasetSource(os.path.join(root, "pretraining"))
    entries = streams.load_stream(
        os.path.join(root, "streams", "random_sequence_1.json"),
        os.path.join(root, "00_info"),
        datasets=datasets,
    )
    targets = streams.parse_targets(entries, os.path.join(root, "00_info"), datasets=datasets)
    tasks = streams.chunk([(t.dataset, t.target) for t in targets], args.tasks)

    def run_task(state, task, sizes, steps, lr, offset):
        update, buffer = mixture.task_pools(catalogue, tasks, task) if task >= 0 else ([], [])
        batches = pipeline.TaskBatches(
            catalogue=catalogue,
            update_ids=update,
            buffer_ids=buffer,
            pretraining=pool,
            batch_sizes=sizes,
            steps=steps,
            seed=args.seed,
            task=task if task >= 0 else 1000,  # pretraining: its own augmentation seeds
            pretraining_offset=offset,
            tokenizer=tokenizer,
            image_size=image_size,
        )
        fresh = state.replace(opt_state=tx.init(state.params))  # fresh optimizer per task
        state = step_lib.place(fresh, shardings)
        start, losses = time.perf_counter(), []
        for step, batch in enumerate(batches.dataset()):
            batch = {"images": batch["images"], "token_ids": batch["token_ids"]}
            state, metrics = step_fn(state, batch, lr[step])
            losses.append(metrics["loss"])
        losses = [float(x) for x in jax.device_get(losses)]
        wall = time.perf_counter() - start
        print(f"task {task}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {wall:.1f}s", flush=True)
        return state, dict(first_loss=losses[0], final_loss=losses[-1], seconds=wall)

    def current_model(state):
        return params_lib.merge(graphdef, state.params)

    pretrain_sizes = {"pretraining": args.batch, "update": 0, "buffer": 0}
    cache = os.path.join(
        args.data,
        f"theta0_v{fif_synth.VERSION}_{args.seed}_{args.pretrain_steps}_{args.pretrain_lr}.npz",
    )
    if os.path.exists(cache):
        with np.load(cache) as f:
            state = state.replace(params=params_lib.unflatten({k: f[k] for k in f.files}))
    else:
        state, _ = run_task(
            state, -1, pretrain_sizes, args.pretrain_steps,
            warmup_cosine(args.pretrain_lr, args.pretrain_steps), 0,
        )  # fmt: skip
        np.savez(cache, **params_lib.flatten(jax.device_get(state.params)))
    theta0 = evaluate(current_model(state), root, datasets, tokenizer, image_size)
    print("theta0", _headline(theta0), flush=True)
    theta0_params = jax.device_get(state.params)
    runs = {}
    for spec in args.mixtures.split(";"):
        ratios = dict(zip(mixture.POOLS, map(float, spec.split(",")), strict=True))
        state = state.replace(params=theta0_params)
        offset, trajectory, sizes_log = args.pretrain_steps * args.batch, [theta0], []
        for task in range(args.tasks):
            sizes = mixture.pool_batch_sizes(args.batch, ratios, task)
            sizes_log.append(sizes)
            lr = warmup_cosine(args.lr, args.steps_per_task)
            state, _ = run_task(state, task, sizes, args.steps_per_task, lr, offset)
            offset += sizes["pretraining"] * args.steps_per_task
            trajectory.append(evaluate(current_model(state), root, datasets, tokenizer, image_size))
            print(f"mixture {spec}, after task {task}", _headline(trajectory[-1]), flush=True)
        runs[spec] = dict(ratios=ratios, batch_sizes=sizes_log, trajectory=trajectory)

    report = dict(
        command="python benchmarks/fif_synth_effects.py "
        + " ".join(f"--{k}={v}" for k, v in vars(args).items() if k not in ("out", "data")),
        date=time.strftime("%Y-%m-%d"),
        hardware=f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
        generate_seconds=generate_seconds,
        chance=evaluate_lib.chance_levels(datasets, root),
        runs=runs,
    )
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(_markdown(report, datasets))


def _headline(scores):
    return " ".join(f"{k} {scores[k]:.1f}" for k in ("A_KA", "A_ZS", "GM"))


def _markdown(report, datasets):
    lines = [
        "# fif_synth: does the synthetic benchmark show continual-learning effects?",
        "",
        f"`{report['command']}`",
        "",
        f"{report['date']}, {report['hardware']}; generating fif_synth took "
        f"{report['generate_seconds']:.1f} s. Tiny CLIP (32 px, 48-token context) pretrained "
        "on the pool (θ0), then plain fine-tuning over the stream's tasks (fresh AdamW and "
        "warmup-cosine per task), from the same θ0 for each mixture. Scores are percent on the "
        "full test splits; A_KA/A_ZS are means over adaptation / evaluation-only sets "
        "(spec §10.5).",
        "",
        "| mixture p/u/b | after | A_KA | A_ZS | GM |",
        "|---|---|---|---|---|",
    ]
    for spec, run in report["runs"].items():
        for t, scores in enumerate(run["trajectory"]):
            after = "θ0" if t == 0 else f"task {t - 1}"
            lines.append(
                f"| {spec} | {after} | {scores['A_KA']:.1f} | {scores['A_ZS']:.1f} "
                f"| {scores['GM']:.1f} |"
            )
    lines += ["", "Per dataset (chance, θ0, and the end of each run):", ""]
    specs = list(report["runs"])
    lines.append(
        "| dataset | role | chance | θ0 | " + " | ".join(f"end, {s}" for s in specs) + " |"
    )
    lines.append("|---|---|---|---|" + "---|" * len(specs))
    for key, info in datasets.items():
        first = report["runs"][specs[0]]["trajectory"][0]["per_dataset"][key]
        ends = [report["runs"][s]["trajectory"][-1]["per_dataset"][key] for s in specs]
        lines.append(
            f"| {key} | {info.role} | {report['chance'][key]:.1f} | {first:.1f} | "
            + " | ".join(f"{e:.1f}" for e in ends)
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
