"""Does fif_synth show continual-learning effects? Pretrain θ0, then fine-tune over the stream.

Measures what decides whether the synthetic benchmark can show anything (issue 3):
θ0's zero-shot accuracy on the evaluation-only sets (should be well above chance) and on the
adaptation sets (near chance), and what plain fine-tuning over the stream does to A_KA (should
rise by tens of points) and A_ZS (should visibly drop).

This is a self-contained measurement on the data layer and the train step, not the continual
runner (which owns evaluation subsets, checkpoints and methods).

python benchmarks/fif_synth_effects.py --out benchmarks/results/fif_synth_effects
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

from fomo_jax import models, runtime, sharding
from fomo_jax import params as params_lib
from fomo_jax.data import fif, fif_synth, mixture, pipeline, registry, streams, webdataset
from fomo_jax.data.synthetic import normalize
from fomo_jax.tokenizer import ByteTokenizer
from fomo_jax.train import optimizer
from fomo_jax.train.step import TrainState, compile_train_step, init_state, state_shardings


def evaluate(model, root, datasets, tokenizer, image_size):
    """Zero-shot accuracy (classification) or mean two-way R@5 (retrieval), in percent."""
    results = {}
    for key, info in datasets.items():
        split = fif.load_split(root, key, "test", datasets=datasets)
        batches = pipeline.EvalImages(pipeline.SplitSource(split), image_size, 256)
        feats = []
        for batch in batches:
            emb = np.asarray(model.encode_image(normalize(batch["images"])))
            feats.append(emb[batch["valid"]])
        image_emb = _unit(np.concatenate(feats))
        if info.is_retrieval:
            texts = [c for r in split for c in r.captions]
            owner = np.repeat(np.arange(len(split)), [len(r.captions) for r in split])
            text_emb = _unit(np.asarray(model.encode_text(tokenizer(texts))))
            sim = image_emb @ text_emb.T
            top_images = np.argsort(-sim.T, axis=1, kind="stable")[:, :5]
            t2i = np.mean(np.any(top_images == owner[:, None], axis=1))
            top_texts = np.argsort(-sim, axis=1, kind="stable")[:, :5]
            i2t = np.mean(np.any(owner[top_texts] == np.arange(len(split))[:, None], axis=1))
            results[key] = 50 * (t2i + i2t)
        else:
            names = [
                info.prompt(c) for c in registry.classnames(info, os.path.join(root, "00_info"))
            ]
            class_emb = _unit(np.asarray(model.encode_text(tokenizer(names))))
            predictions = np.argmax(image_emb @ class_emb.T, axis=1)
            results[key] = 100 * float(np.mean(predictions == split.targets))
    return results


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def summarize(results, datasets):
    adapt = [results[k] for k, d in datasets.items() if d.role == "adaptation"]
    zs = [results[k] for k, d in datasets.items() if d.role == "evaluation"]
    a_ka, a_zs = float(np.mean(adapt)), float(np.mean(zs))
    return dict(A_KA=a_ka, A_ZS=a_zs, GM=float(np.sqrt(a_ka * a_zs)), per_dataset=results)


def warmup_cosine(lr, steps):
    warmup = max(1, int(np.ceil(0.1 * steps)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 1e-3)
    return [float(schedule(s)) for s in range(steps)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/fif_synth_effects")
    parser.add_argument("--data", default="/tmp/fif_synth")
    parser.add_argument("--pretrain_steps", type=int, default=600)
    parser.add_argument("--pretrain_lr", type=float, default=2e-3)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps_per_task", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mixture", default="0.33,0.34,0.33", help="pretraining,update,buffer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()
    runtime.enable_compilation_cache()
    os.makedirs(args.out, exist_ok=True)

    t0 = time.perf_counter()
    fif_synth.generate(args.data, seed=args.seed)
    generate_seconds = time.perf_counter() - t0
    root, datasets = args.data, fif_synth.load_datasets(args.data)

    cfg = models.get_config("tiny")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, context_length=48))
    image_size = cfg.vision.image_size
    tokenizer = ByteTokenizer(context_length=48)
    model = models.create_model(cfg, seed=args.seed)
    graphdef, params = params_lib.split(model)
    tx = optimizer.adamw(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.2, clip_norm=1.0)
    mesh = sharding.make_mesh()
    shardings = state_shardings(jax.eval_shape(lambda p: TrainState.create(p, tx), params), mesh)
    step_fn = compile_train_step(graphdef, tx, mesh, shardings)

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
            task=max(task, 0) + (1000 if task < 0 else 0),
            pretraining_offset=offset,
            tokenizer=tokenizer,
            image_size=image_size,
        )
        state = init_state(state.params, tx, shardings)  # fresh optimizer per task
        wait, start, losses = 0.0, time.perf_counter(), []
        for step, batch in enumerate(batches.dataset()):
            t = time.perf_counter()
            batch = {"images": batch["images"], "token_ids": batch["token_ids"]}
            wait += time.perf_counter() - t
            state, metrics = step_fn(state, batch, lr[step])
            losses.append(metrics["loss"])
        losses = [float(x) for x in jax.device_get(losses)]
        wall = time.perf_counter() - start
        print(f"task {task}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {wall:.1f}s", flush=True)
        return state, dict(first_loss=losses[0], final_loss=losses[-1], seconds=wall)

    def current_model(state):
        return params_lib.merge(graphdef, state.params)

    state = TrainState.create(params, tx)
    pretrain_sizes = {"pretraining": args.batch, "update": 0, "buffer": 0}
    cache = os.path.join(
        args.data, f"theta0_{args.seed}_{args.pretrain_steps}_{args.pretrain_lr}.npz"
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
    trajectory = [summarize(evaluate(current_model(state), root, datasets, tokenizer, image_size),
                            datasets)]  # fmt: skip
    print(
        "theta0",
        json.dumps({k: round(v, 1) for k, v in trajectory[0].items() if k != "per_dataset"}),
    )
    ratios = dict(
        zip(("pretraining", "update", "buffer"), map(float, args.mixture.split(",")), strict=False)
    )
    offset, sizes_log = args.pretrain_steps * args.batch, []
    for task in range(args.tasks):
        sizes = mixture.pool_batch_sizes(args.batch, ratios, task)
        sizes_log.append(sizes)
        state, _ = run_task(state, task, sizes, args.steps_per_task,
                            warmup_cosine(args.lr, args.steps_per_task), offset)  # fmt: skip
        offset += sizes["pretraining"] * args.steps_per_task
        trajectory.append(
            summarize(
                evaluate(current_model(state), root, datasets, tokenizer, image_size), datasets
            )
        )
        print(
            f"after task {task}",
            json.dumps({k: round(v, 1) for k, v in trajectory[-1].items() if k != "per_dataset"}),
        )

    chance = {k: (100 / d.num_classes if d.num_classes else None) for k, d in datasets.items()}
    report = dict(
        args=vars(args),
        generate_seconds=generate_seconds,
        chance=chance,
        batch_sizes=sizes_log,
        trajectory=trajectory,
        hardware=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].platform}",
    )
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
