"""Train a CLIP from scratch on the pretraining pool of fif_synth: the default job of `run.py`
until the continual runner lands, and the seed of its "major update" (making θ0).

The data is fif_synth (generated once under `config.data.root`): the model trains on its
WebDataset pool through the grain pipeline and is evaluated zero-shot on every test split,
which shows what θ0 knows (the evaluation-only sets) and what it does not (the adaptation sets).

Writes to the work directory: `config.json`, `metrics.jsonl` (one line per logged step),
`results.json` (first/last loss, per-dataset zero-shot scores before and after, A_KA / A_ZS,
throughput), `plots/training.png` (loss per step and learning rate), and the trained model in
the Hugging Face layout under `model/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
import optax

from fomo_jax import evaluate as evaluate_lib
from fomo_jax import models, sharding
from fomo_jax import params as params_lib
from fomo_jax.data import fif_synth, pipeline, webdataset
from fomo_jax.tokenizer import ByteTokenizer
from fomo_jax.train import optimizer
from fomo_jax.train.step import TrainState, compile_train_step, init_state, state_shardings


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _plot_training(losses, learning_rates, accuracy, path):
    """Per-step loss (raw and smoothed) above the learning-rate schedule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(losses) + 1)
    window = max(1, len(losses) // 30)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    top.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="per step")
    top.plot(steps[window - 1 :], smooth, color="tab:blue", lw=2, label=f"mean of {window} steps")
    top.set(
        ylabel="contrastive loss",
        yscale="log",
        title=f"CLIP pretraining: zero-shot A_ZS {accuracy[0]:.1f}% -> {accuracy[1]:.1f}%",
    )
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot(steps, learning_rates, color="tab:orange")
    bottom.set(xlabel="step", ylabel="learning rate")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))

    model_config = models.get_config(
        config.model.name,
        dtype=config.model.dtype,
        attention_implementation=config.model.attention_implementation,
    )
    if config.model.context_length:
        text = dataclasses.replace(model_config.text, context_length=config.model.context_length)
        model_config = model_config.replace(text=text)
    image_size, context = model_config.vision.image_size, model_config.text.context_length
    tokenizer = ByteTokenizer(context_length=context)
    if model_config.text.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model {config.model.name} has a {model_config.text.vocab_size}-token vocabulary; "
            f"the byte tokenizer needs {tokenizer.vocab_size}"
        )

    mesh = sharding.make_mesh(**config.mesh)
    model = models.create_model(model_config, seed=config.seed)
    graphdef, params = params_lib.split(model)
    tx = optimizer.adamw(
        b1=config.optimizer.b1,
        b2=config.optimizer.b2,
        eps=config.optimizer.eps,
        weight_decay=config.optimizer.weight_decay,
        clip_norm=config.optimizer.clip_norm,
        decay_convention=config.optimizer.decay_convention,
    )
    shardings = state_shardings(jax.eval_shape(lambda p: TrainState.create(p, tx), params), mesh)
    state = init_state(params, tx, shardings)
    step_fn = compile_train_step(graphdef, tx, mesh, shardings)
    warmup = int(np.ceil(config.optimizer.warmup_fraction * config.steps))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.optimizer.lr,
        max(warmup, 1),
        config.steps,
        end_value=config.optimizer.lr * config.optimizer.min_lr_multiplier,
    )
    # Evaluated once on the host: the step takes the rate as an input, the plot shows it.
    learning_rates = [float(schedule(step)) for step in range(config.steps)]

    root = config.data.root
    fif_synth.generate(
        root,
        seed=config.data.seed,
        image_size=config.data.image_size,
        train_per_class=config.data.train_per_class,
        test_per_class=config.data.test_per_class,
        pool_size=config.data.pool_size,
        samples_per_shard=config.data.samples_per_shard,
    )
    datasets = fif_synth.load_datasets(root)
    pool = webdataset.WebDatasetSource(os.path.join(root, "pretraining"))

    evaluator = evaluate_lib.Evaluator(root, datasets, tokenizer, image_size)  # decodes once

    def evaluate(state):
        results = evaluator.evaluate(params_lib.merge(graphdef, state.params), subset=False)
        scores = {k: evaluate_lib.headline(v) for k, v in results.items()}
        return dict(evaluate_lib.summarize(scores, datasets), per_dataset=scores)

    before = evaluate(state)
    logging.info(
        "model %s: %.2fM parameters; mesh %s; %d steps of batch %d",
        config.model.name,
        optimizer.trainable_count(params) / 1e6,
        dict(mesh.shape),
        config.steps,
        config.batch_size,
    )

    data = iter(
        pipeline.pool_batches(
            pool, batch_size=config.batch_size, steps=config.steps, seed=config.seed,
            tokenizer=tokenizer, image_size=image_size, num_threads=config.data.num_threads,
        ).dataset()
    )  # fmt: skip
    records, losses, pending = [], [], []
    window_start, data_wait = time.perf_counter(), 0.0
    start = time.perf_counter()
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as log:
        for step in range(config.steps):
            t0 = time.perf_counter()
            batch = next(data)
            data_wait += time.perf_counter() - t0
            batch = {"images": batch["images"], "token_ids": batch["token_ids"]}
            state, metrics = step_fn(state, batch, learning_rates[step])
            pending.append(metrics["loss"])  # fetched at the next log point, not every step
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                fetched = [float(x) for x in jax.device_get(pending)]
                if not np.all(np.isfinite(fetched)):
                    bad = len(losses) + int(np.argmin(np.isfinite(fetched))) + 1
                    raise FloatingPointError(f"non-finite loss at step {bad}")
                losses += fetched
                pending = []
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not metrics["finite"]:
                    raise FloatingPointError(f"non-finite gradient at step {step + 1}")
                now = time.perf_counter()
                steps_in_window = (step + 1) - (records[-1]["step"] if records else 0)
                rate = steps_in_window * config.batch_size / (now - window_start)
                record = dict(
                    step=step + 1,
                    samples_per_second=rate,
                    data_wait_fraction=data_wait / (now - window_start),
                    **metrics,
                )
                records.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                eta = (config.steps - step - 1) * config.batch_size / rate
                logging.info(
                    "step %d/%d | loss %.4f | lr %.2e | %.0f samples/s | data wait %.0f%% | ETA %s",
                    step + 1,
                    config.steps,
                    metrics["loss"],
                    metrics["learning_rate"],
                    rate,
                    100 * record["data_wait_fraction"],
                    _format_eta(eta),
                )
                window_start, data_wait = time.perf_counter(), 0.0

    wall = time.perf_counter() - start
    after = evaluate(state)
    results = {
        "steps": config.steps,
        "samples": config.steps * config.batch_size,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "zero_shot_before": before,
        "zero_shot_after": after,
        "chance": evaluate_lib.chance_levels(datasets, root),
        "pool_manifest": pool.manifest(),  # which pretraining data this model saw (spec §2.7)
        "wall_seconds": wall,
        "samples_per_second": config.steps * config.batch_size / wall,
    }
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    _plot_training(
        losses,
        learning_rates,
        (before["A_ZS"], after["A_ZS"]),
        os.path.join(workdir, "plots", "training.png"),
    )
    models.export_hf(
        params_lib.merge(graphdef, jax.device_get(state.params)),
        f"{workdir}/model",
        tokenizer=tokenizer,
    )
    return results
