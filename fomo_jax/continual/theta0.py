"""θ0, the zero-shot starting point: a pretrained checkpoint, or a CLIP pretrained here once.

For fif_synth the "major update" is made by training the model from scratch on the pretraining
pool (the default job's recipe) and cached next to the data, keyed by everything that decides
it. The cache is written atomically, so a run killed while making θ0 simply makes it again and
gets the same weights (the pretraining is a pure function of its config).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import jax
import numpy as np
import optax

from fomo_jax import models
from fomo_jax import params as params_lib
from fomo_jax.data import pipeline
from fomo_jax.train import optimizer
from fomo_jax.train.step import TrainState, compile_train_step, init_state, state_shardings


def cache_path(directory: str, model_config, recipe: dict) -> str:
    key = json.dumps({"model": repr(model_config), **recipe}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(directory, f"theta0-{digest}.npz")


def pretrain(model_config, tokenizer, pool, recipe: dict, mesh, bad_images="error") -> dict:
    """Train a fresh CLIP on the pool with warmup-cosine AdamW; returns host params.
    `bad_images`: the pipeline's policy for undecodable images (`pipeline.TaskBatches`)."""
    model = models.create_model(model_config, seed=recipe["seed"])
    graphdef, params = params_lib.split(model)
    tx = optimizer.adamw(weight_decay=recipe["weight_decay"], clip_norm=1.0)
    shardings = state_shardings(jax.eval_shape(lambda p: TrainState.create(p, tx), params), mesh)
    state = init_state(params, tx, shardings)
    step_fn = compile_train_step(graphdef, tx, mesh, shardings)
    steps, lr = recipe["steps"], recipe["lr"]
    warmup = max(1, int(np.ceil(0.1 * steps)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 1e-3)
    batches = pipeline.pool_batches(
        pool, batch_size=recipe["batch_size"], steps=steps, seed=recipe["seed"],
        tokenizer=tokenizer, image_size=model_config.vision.image_size, num_threads=0,
        bad_images=bad_images,
    )  # fmt: skip
    start, skipped = time.perf_counter(), 0
    for step, batch in enumerate(batches.dataset()):
        skipped += int(batch["skipped"])
        batch = {"images": batch["images"], "token_ids": batch["token_ids"]}
        state, metrics = step_fn(state, batch, float(schedule(step)))
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                raise FloatingPointError(f"θ0 pretraining: non-finite loss at step {step + 1}")
            rate = (step + 1) / (time.perf_counter() - start)
            logging.info(
                "θ0 pretraining step %d/%d | loss %.4f | ETA %.0fs",
                step + 1,
                steps,
                loss,
                (steps - step - 1) / rate,
            )
    if skipped:
        logging.warning("θ0 pretraining skipped %d undecodable pool images", skipped)
    return jax.device_get(state.params)


def pool_fingerprint(pool) -> str:
    """The content hash of a WebDataset pool or of ArrayRecord shards."""
    manifest = pool.manifest() if callable(pool.manifest) else pool.manifest
    return manifest.get("content_hash") or manifest["content_sha256"]


def load_or_make(config, model_config, tokenizer, pool, cache_dir: str, mesh) -> dict:
    """θ0 params: from `config.theta0.checkpoint`, from the cache, or pretrained and cached."""
    if config.theta0.checkpoint:
        model = models.load_pretrained(config.theta0.checkpoint)
        return jax.device_get(params_lib.split(model)[1])
    recipe = dict(
        steps=config.theta0.steps,
        batch_size=config.theta0.batch_size,
        lr=config.theta0.lr,
        weight_decay=config.theta0.weight_decay,
        seed=config.seed,
        pool=pool_fingerprint(pool),
    )
    path = cache_path(cache_dir, model_config, recipe)
    if os.path.exists(path):
        logging.info("θ0 from cache %s", path)
        with np.load(path) as f:
            return params_lib.unflatten({k: f[k] for k in f.files})
    logging.info(
        "making θ0: %d steps of batch %d on the pool", recipe["steps"], recipe["batch_size"]
    )
    params = pretrain(model_config, tokenizer, pool, recipe, mesh, config.data.bad_images)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **params_lib.flatten(params))
    os.replace(tmp, path)  # atomic: a killed run never leaves half a cache
    return params
