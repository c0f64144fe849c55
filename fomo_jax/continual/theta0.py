"""θ0, the zero-shot starting point: a pretrained checkpoint, or a model pretrained here once.

For fif_synth the "major update" is made by training the family's model from scratch on the
pretraining pool (warmup-cosine AdamW) and cached next to the data, keyed by everything that
decides it. Making it is a job of the one training loop (`continual.loop`) in its own work
directory beside the cache (`theta0-<key>.work/`: checkpoints, metrics, TensorBoard), held
under a lock, so a run killed while θ0 is made resumes it from its last checkpoint to exactly
the weights an uninterrupted making gives, and two runs never make the same θ0 at once. The
cache file is written atomically; the job's checkpoints are removed once it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil

import ml_collections
import numpy as np
import optax

from fomo_jax import distributed, sharding
from fomo_jax import params as params_lib
from fomo_jax.continual import loop as loop_lib
from fomo_jax.continual import methods
from fomo_jax.continual import workdir as workdir_lib
from fomo_jax.data import pipeline
from fomo_jax.train import optimizer


def cache_path(directory: str, model_config, recipe: dict) -> str:
    key = json.dumps({"model": repr(model_config), **recipe}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(directory, f"theta0-{digest}.npz")


def pool_fingerprint(pool) -> str:
    """The content hash of a WebDataset pool or of ArrayRecord shards."""
    manifest = pool.manifest() if callable(pool.manifest) else pool.manifest
    return manifest.get("content_hash") or manifest["content_sha256"]


def warmup_cosine(lr: float, steps: int):
    """θ0's schedule: linear warmup over 10% of the steps, cosine to lr·1e-3 (host floats)."""
    warmup = max(1, int(np.ceil(0.1 * steps)))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr * 1e-3)


def adamw_config(weight_decay: float) -> ml_collections.ConfigDict:
    """θ0's optimizer (`train.optimizer.build`): AdamW with clipping, decay on every leaf."""
    return ml_collections.ConfigDict(dict(b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0,
                                          weight_decay=weight_decay,
                                          decay_convention="all"))  # fmt: skip


def pretraining_job(workdir, family, model_config, tokenizer, pool, *, steps, batch_size,
                    learning_rates, optimizer_config, seed, mesh, log_every, checkpoint_every,
                    bad_images="error", max_bad_images=0, num_threads=0, whole_batches=False,
                    name="pretraining", **job) -> loop_lib.Job:  # fmt: skip
    """A one-task job of the loop: the family's model trained on the pool alone with full
    fine-tuning (θ0 making and the pretraining job). `learning_rates`: one per step; `job`:
    further `loop.Job` fields (evaluation hooks, W&B config, ...)."""
    method = methods.get("finetune")
    method.setup(methods.Context(
        config=ml_collections.ConfigDict({"seed": seed}), family=family,
        model_config=model_config, tokenizer=tokenizer, data=methods.NoData(), workdir=workdir,
        steps_per_task=steps,
    ))  # fmt: skip
    rows = None  # with several processes, each loads its rows of every global batch
    if distributed.multiprocess():
        rows = distributed.local_rows(sharding.batch_sharding(mesh), batch_size)
    batches = pipeline.pool_batches(
        pool, batch_size=batch_size, steps=steps, seed=seed, tokenizer=tokenizer,
        image_size=family.image_size(model_config), num_threads=num_threads,
        bad_images=bad_images, rows=rows, whole_batches=whole_batches,
    )  # fmt: skip
    return loop_lib.Job(
        workdir=workdir, family=family, method=method, tx=optimizer.build(optimizer_config),
        mesh=mesh, steps=steps, num_tasks=1, lr_of=lambda task, step: learning_rates[step],
        batches=lambda task, record: batches, seed=seed, log_every=log_every,
        checkpoint_every=checkpoint_every, max_bad_images=max_bad_images,
        bad_images_note="config.data.max_bad_image_fraction of the pool's samples", name=name,
        **job,
    )  # fmt: skip


def load_or_make(config, family, model_config, data, cache_dir: str, mesh) -> dict:
    """θ0 params: from `config.theta0.checkpoint`, from the cache, or pretrained and cached."""
    if config.theta0.checkpoint:
        return family.load_params(config.theta0.checkpoint, model_config)
    t = config.theta0
    recipe = dict(steps=t.steps, batch_size=t.batch_size, lr=t.lr, weight_decay=t.weight_decay,
                  seed=config.seed, pool=pool_fingerprint(data.pool))  # fmt: skip
    if config.get("loss", "clip") != "clip":  # made with that loss (default: keys unchanged)
        recipe["loss"] = config.loss
    path = cache_path(cache_dir, model_config, recipe)
    workdir = path.removesuffix(".npz") + ".work"
    distributed.barrier("theta0 looked up")  # every process sees the cache as it was
    if not os.path.exists(path):
        # Process 0 holds the lock; every process trains (the job is multi-process).
        lock = workdir_lib.locked(workdir) if distributed.primary() else contextlib.nullcontext()
        with lock:
            if not os.path.exists(path):  # else made while this process waited for the lock
                _make(config, family, model_config, data, recipe, path, workdir, mesh)
        distributed.barrier("theta0 written")
    logging.info("θ0 from cache %s", path)
    with np.load(path) as f:
        return params_lib.unflatten({k: f[k] for k in f.files})


def _make(config, family, model_config, data, recipe, path, workdir, mesh) -> None:
    logging.info("making θ0 in %s: %d steps of batch %d on the pool", workdir,
                 recipe["steps"], recipe["batch_size"])  # fmt: skip
    skip = config.data.bad_images == "skip"
    samples = recipe["steps"] * recipe["batch_size"]
    steps, schedule = recipe["steps"], warmup_cosine(recipe["lr"], recipe["steps"])
    job = pretraining_job(
        workdir, family, model_config, data.tokenizer, data.pool, steps=steps,
        batch_size=recipe["batch_size"], seed=recipe["seed"], mesh=mesh,
        learning_rates=[float(schedule(step)) for step in range(steps)],
        optimizer_config=adamw_config(recipe["weight_decay"]), log_every=max(1, steps // 10),
        checkpoint_every=config.checkpoint_every, bad_images=config.data.bad_images,
        max_bad_images=int(config.data.max_bad_image_fraction * samples) if skip else 0,
        num_threads=config.data.num_threads, whole_batches=data.whole_batches, name="θ0",
    )  # fmt: skip
    model = family.init_model(model_config, seed=recipe["seed"])
    state, record = loop_lib.train(job, params_lib.split(model)[1])
    if record["bad_images"]:
        logging.warning("θ0 pretraining skipped %d undecodable pool images", record["bad_images"])
    params = distributed.to_host(state.params)
    if not distributed.primary():  # one writer
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **params_lib.flatten(params))
    os.replace(tmp, path)  # atomic: a killed run never leaves half a cache
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
