"""Train a CLIP from scratch on the pretraining pool of fif_synth (`configs/clip_synth.py`): the
recipe of θ0's "major update", as a job of the one training loop (`continual.loop`), so it
checkpoints, resumes bit-identically after a kill, catches divergence and logs like every job.

The data is fif_synth (generated once under `config.data.root`): the model trains on its
WebDataset pool through the grain pipeline and is evaluated zero-shot on every test split,
which shows what θ0 knows (the evaluation-only sets) and what it does not (the adaptation sets).

Writes to the work directory: `config.json`, `metrics.jsonl` (one line per logged step),
`tensorboard/`, `checkpoints/`, `results.json` (first/last loss, per-dataset zero-shot scores
before and after, A_KA / A_ZS, throughput), `plots/training.png` (loss per step and learning
rate), and the trained model in the Hugging Face layout under `model/`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
import optax

from fomo_jax import distributed, families, models, sharding
from fomo_jax import evaluate as evaluate_lib
from fomo_jax import params as params_lib
from fomo_jax.continual import loop as loop_lib
from fomo_jax.continual import theta0
from fomo_jax.continual import workdir as workdir_lib
from fomo_jax.data import fif_synth, webdataset
from fomo_jax.tokenizer import ByteTokenizer
from fomo_jax.train import optimizer


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


def _logged_rate(workdir: str) -> float:
    """The median training throughput of the logged steps (resumed jobs included)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rates = [json.loads(line)["samples_per_second"] for line in f if line.strip()]
    return float(np.median(rates))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume, or report) the pretraining job of `config` in `workdir`."""
    results_path = os.path.join(workdir, "results.json")
    # The run's identity; the model's memory levers only where not at their defaults.
    recorded = models.drop_default_memory_options(json.loads(config.to_json_best_effort()))
    config_json = json.dumps(recorded, indent=2)
    os.makedirs(workdir, exist_ok=True)
    # One writer (process 0 of a multi-process run) holds the lock and writes the files.
    lock = workdir_lib.locked(workdir) if distributed.primary() else contextlib.nullcontext()
    with lock, workdir_lib.Preemption():
        if distributed.primary():
            workdir_lib.same_config_or_fresh(workdir, config_json)
        distributed.barrier("config recorded")
        if os.path.exists(results_path):  # complete
            with open(results_path) as f:
                return json.load(f)
        return _train(config, workdir)


def _train(config, workdir) -> dict:
    family = families.get("clip")
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    run_config = ml_collections.ConfigDict(dict(
        theta0=dict(checkpoint=None), model=config.model.to_dict()))  # fmt: skip
    model_config = family.model_config(run_config)
    image_size, context = model_config.vision.image_size, model_config.text.context_length
    tokenizer = ByteTokenizer(context_length=context)
    if model_config.text.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model {config.model.name} has a {model_config.text.vocab_size}-token vocabulary; "
            f"the byte tokenizer needs {tokenizer.vocab_size}"
        )
    mesh = sharding.make_mesh(**config.mesh)
    warmup = int(np.ceil(config.optimizer.warmup_fraction * config.steps))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.optimizer.lr, max(warmup, 1), config.steps,
        end_value=config.optimizer.lr * config.optimizer.min_lr_multiplier,
    )  # fmt: skip
    # Evaluated once on the host: the step takes the rate as an input, the plot shows it.
    learning_rates = [float(schedule(step)) for step in range(config.steps)]

    root = config.data.root
    with distributed.primary_first("fif_synth generated"):
        fif_synth.generate(
            root, seed=config.data.seed, image_size=config.data.image_size,
            train_per_class=config.data.train_per_class,
            test_per_class=config.data.test_per_class, pool_size=config.data.pool_size,
            samples_per_shard=config.data.samples_per_shard,
        )  # fmt: skip
    datasets = fif_synth.load_datasets(root)
    pool = webdataset.WebDatasetSource(os.path.join(root, "pretraining"))
    evaluator = evaluate_lib.Evaluator(root, datasets, tokenizer, image_size, mesh=mesh,
                                       rules=family.rules,
                                       cache_dir=os.path.join(workdir, "eval_images"))  # fmt: skip
    graphdef = family.graphdef(model_config)

    def evaluate(params):
        results = evaluator.evaluate(params_lib.merge(graphdef, params), subset=False)
        scores = {k: evaluate_lib.headline(v) for k, v in results.items()}
        return dict(evaluate_lib.summarize(scores, datasets), per_dataset=scores)

    model = family.init_model(model_config, seed=config.seed)
    params = params_lib.split(model)[1]
    logging.info("model %s: %.2fM parameters; mesh %s; %d steps of batch %d", config.model.name,
                 optimizer.trainable_count(params) / 1e6, dict(mesh.shape), config.steps,
                 config.batch_size)  # fmt: skip
    job = theta0.pretraining_job(
        workdir, family, model_config, tokenizer, pool, steps=config.steps,
        batch_size=config.batch_size, learning_rates=learning_rates,
        optimizer_config=config.optimizer, seed=config.seed, mesh=mesh,
        log_every=config.log_every, checkpoint_every=config.checkpoint_every,
        num_threads=config.data.num_threads, name="", keep_losses=True,
        zero_shot=lambda p: {"zero_shot_before": evaluate(p)}, final_evaluation=True,
    )  # fmt: skip
    start = time.perf_counter()
    state, record = loop_lib.train(job, params)
    wall = time.perf_counter() - start
    params = state.params
    if distributed.multiprocess():  # sharded across hosts: a full copy on each
        params = distributed.to_host(params)
    after = evaluate(params)
    if not distributed.primary():  # the writer writes; the others read its results
        distributed.barrier("results written")
        with open(os.path.join(workdir, "results.json")) as f:
            return json.load(f)
    before, losses = record["zero_shot_before"], record["losses"]
    results = {
        "steps": config.steps,
        "samples": config.steps * config.batch_size,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "zero_shot_before": before,
        "zero_shot_after": after,
        "chance": evaluate_lib.chance_levels(datasets, root),
        "pool_manifest": pool.manifest(),  # which pretraining data this model saw (spec §2.7)
        "wall_seconds": wall,  # of this process (a resumed job: its part)
        "samples_per_second": _logged_rate(workdir),
    }
    _plot_training(losses, learning_rates, (before["A_ZS"], after["A_ZS"]),
                   os.path.join(workdir, "plots", "training.png"))  # fmt: skip
    family.export(jax.device_get(params), model_config, os.path.join(workdir, "model"),
                  tokenizer)  # fmt: skip
    workdir_lib.write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
    distributed.barrier("results written")
    return results
