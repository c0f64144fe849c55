"""The continual runner: θ0, then for each task train, end-of-task hook, evaluate, checkpoint.

Spec §7.1 (loop), §8.1 (weight bookkeeping), §10 (evaluation), §11 (checkpoints). One jitted
step serves the whole stream (the learning rate is a host-computed input). The run is a pure
function of its config: a checkpoint stores the train state, the method state and the run's
progress, and the input pipeline is rebuilt from (seed, task, step), so a killed run resumes
to exactly the result of an uninterrupted one.

Work directory: `config.json`, `metrics.jsonl` (per logged step), `results.json` (`final` and
`trajectory`, metrics only), `plots/` (A_KA-A_ZS trajectory, per-dataset heatmap, learning
rate), `checkpoints/`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fomo_jax import budget, models, schedules, sharding
from fomo_jax import evaluate as evaluate_lib
from fomo_jax import params as params_lib
from fomo_jax.continual import methods, plots, theta0
from fomo_jax.continual import workdir as workdir_lib
from fomo_jax.continual.checkpoints import Checkpoints
from fomo_jax.continual.logger import RunLogger
from fomo_jax.continual.step import (
    ContinualState,
    compile_step,
    make_forward,
    shardings_of,
    trained,
)
from fomo_jax.data import (
    fif,
    fif_synth,
    mixture,
    pipeline,
    records,
    registry,
    streams,
    webdataset,
)
from fomo_jax.models.clip import abstract_clip
from fomo_jax.tokenizer import load_tokenizer
from fomo_jax.train import optimizer

METRIC_KEYS = ("knowledge_accumulation", "zero_shot_retention", "geometric_mean")


@dataclasses.dataclass
class Data:
    root: str
    datasets: dict
    catalogue: mixture.Catalogue
    pool: webdataset.WebDatasetSource | records.RecordSource
    tasks: list


def benchmark_datasets(config) -> dict:
    """{key: DatasetInfo} of the config's benchmark (fif_synth is generated first if missing;
    it is deterministic): the datasets a run trains on and evaluates."""
    d = config.data
    if d.benchmark == "fif_synth":
        fif_synth.generate(
            d.root, seed=d.synth_seed, image_size=d.image_size, pool_size=d.pool_size,
            train_per_class=d.train_per_class, test_per_class=d.test_per_class,
            samples_per_shard=d.samples_per_shard,
        )  # fmt: skip
        return fif_synth.load_datasets(d.root)
    if d.benchmark == "fif":
        if not os.path.isdir(d.root):
            raise FileNotFoundError(f"config.data.root={d.root!r} is not a directory")
        return dict(registry.DATASETS)
    raise ValueError(f"config.data.benchmark must be 'fif_synth' or 'fif', got {d.benchmark!r}")


def prepare_data(config) -> Data:
    """The benchmark's datasets, the stream's tasks, the training catalogue and the pool."""
    d = config.data
    datasets = benchmark_datasets(config)
    info_dir = d.info_dir or fif.default_info_dir(d.root)
    stream_path = d.stream or os.path.join(d.root, "streams", "random_sequence_1.json")
    entries = streams.load_stream(stream_path, info_dir, datasets=datasets)
    targets = streams.parse_targets(entries, info_dir, datasets=datasets)
    tasks = streams.chunk([(t.dataset, t.target) for t in targets], config.num_tasks)
    sources = {
        key: pipeline.SplitSource(fif.load_split(d.root, key, "train", info_dir, datasets=datasets))
        for key in streams.stream_datasets(entries)
    }
    pool_dir = d.pretraining_pool or os.path.join(d.root, "pretraining")
    if os.path.exists(os.path.join(pool_dir, "manifest.json")):  # ArrayRecord shards
        pool = records.RecordSource(pool_dir)
    else:  # WebDataset tar shards
        pool = webdataset.WebDatasetSource(pool_dir)
    return Data(d.root, datasets, mixture.Catalogue(sources), pool, tasks)


def task_budget(config, method, model_config, tx) -> dict:
    """Steps per task and where they come from (spec §5): `config.steps_per_task` or
    `config.n_samples` as given, or the stream budget of `config.budget` ("paper": Table 4;
    "measured": MAFs of the compiled steps). With `config.equal_compute`, a given step count is
    full fine-tuning's, and the method gets it x MAF_finetune / MAF_method (MAFs again from
    `config.budget`), so methods compare at equal compute on any stream length."""
    mafs = {}
    if config.budget == "measured":  # MAF of this method's step relative to full FT
        if not (config.steps_per_task or config.n_samples) or config.equal_compute:
            profile, full = (
                budget.profile_method(profiling_instance(config, model_config, name),
                                      model_config, tx, config.batch_size)
                for name in (config.method, "finetune")
            )  # fmt: skip
            mafs = dict(measured_maf=budget.maf(profile, full)["maf"],
                        full_maf=budget.maf(full, full)["maf"])  # fmt: skip
    elif config.budget != "paper":
        raise ValueError(f"config.budget={config.budget!r}; expected 'paper' or 'measured'")
    rank = method.config.get("rank")
    if not (config.steps_per_task or config.n_samples):
        return budget.task_budget(method.name, config.num_tasks, batch_size=config.batch_size,
                                  budget=config.budget, rank=rank, **mafs)  # fmt: skip
    if config.steps_per_task:
        steps, source = int(config.steps_per_task), "config.steps_per_task"
    else:
        steps, source = int(config.n_samples) // config.batch_size, "config.n_samples"
    info = dict(method=method.name, num_tasks=config.num_tasks, maf_source=None)
    if config.equal_compute:
        if not mafs:  # budget="paper"
            mafs = dict(measured_maf=budget.paper_row(method.name, rank).maf,
                        full_maf=budget.PAPER_TABLE["finetune"].maf)  # fmt: skip
        # floor(steps x MAF_full / MAF_m): the budget formula with `steps` as full FT's T_s.
        maf, full_maf = mafs["measured_maf"], mafs["full_maf"]
        if steps * full_maf < maf:
            raise ValueError(
                f"config.equal_compute: {method.name} (MAF {maf / full_maf:.2f}x fine-tuning's) "
                f"gets no step of {steps}; give more steps"
            )
        steps = budget.budget_steps(1, maf, full_maf, full_steps=steps)
        source += f" x MAF_finetune / MAF_{method.name} ({config.budget} MAFs)"
        info.update(maf=mafs["measured_maf"], full_maf=mafs["full_maf"],
                    maf_source="Table 4" if config.budget == "paper" else "measured")  # fmt: skip
    return dict(info, steps_per_task=steps, total_steps=steps * config.num_tasks,
                n_samples=budget.n_samples(steps, config.batch_size), source=source)  # fmt: skip


def profiling_instance(config, model_config, name=None) -> methods.Method:
    """Method `name` (default: the configured one) set up without data, for compiling (not
    running) its step."""
    name = name or config.method
    method = methods.get(name, config.methods.get(name))
    graphdef = params_lib.split(abstract_clip(method.model_config(model_config)))[0]
    method.setup(methods.Context(
        config=config, workdir=None, model_config=model_config, graphdef=graphdef,
        tokenizer=None, forward=make_forward(graphdef), steps_per_task=None,
    ))  # fmt: skip
    return method


def schedule_of(config, steps: int) -> schedules.Schedule:
    """`config.schedule`: its name and the parameters that are set (others: spec defaults)."""
    params = {k: v for k, v in config.schedule.items() if k != "name" and v is not None}
    if config.schedule.name == "multistep":
        params.setdefault("batch_size", config.batch_size)  # milestones are in samples
    return schedules.make(config.schedule.name, base_lr=config.optimizer.lr,
                          steps_per_task=steps, num_tasks=config.num_tasks, **params)  # fmt: skip


def budget_report(config, budget_info: dict, model_config) -> str:
    """The start-up budget table of the run (`budget.startup_report`): its own model and
    steps, and Table 4 only when the run uses the paper's budget on the paper's model."""
    from fomo_jax.models.convert import infer_openclip_name

    model = infer_openclip_name(model_config)  # a θ0 checkpoint is named by its shapes
    if model is None:
        model = config.theta0.checkpoint or config.model.name
    return budget.startup_report(budget_info, model=model, budget=config.budget)


def model_and_tokenizer(config):
    """The model config (from θ0's checkpoint when one is given) and its tokenizer."""
    if config.theta0.checkpoint:
        model_config = models.load_pretrained(config.theta0.checkpoint).config
    else:
        model_config = models.get_config(config.model.name)
        if config.model.context_length:
            text = dataclasses.replace(model_config.text,
                                       context_length=config.model.context_length)  # fmt: skip
            model_config = model_config.replace(text=text)
    model_config = model_config.replace(
        dtype=config.model.dtype, attention_implementation=config.model.attention_implementation
    )
    tokenizer = load_tokenizer(config.tokenizer, context_length=model_config.text.context_length)
    if tokenizer.vocab_size > model_config.text.vocab_size:  # else only the export would fail
        raise ValueError(
            f"config.tokenizer={config.tokenizer!r} has {tokenizer.vocab_size} ids, more than "
            f"the model's text vocabulary of {model_config.text.vocab_size}"
        )
    return model_config, tokenizer


def _headline(summary: dict) -> str:
    return " | ".join(f"{k} {summary[k]:.2f}" for k in METRIC_KEYS)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume, or report) the continual experiment of `config` in `workdir`.

    The whole config is checked before anything is written, so a failed start leaves the work
    directory reusable; then the run holds the directory's lock (one writer at a time) and
    turns SIGTERM into a checkpoint at the current step (`workdir.Preempted`)."""
    started = time.perf_counter()
    setup = _check_config(config)
    config_json = _config_json(config)
    results_path = os.path.join(workdir, "results.json")
    if os.path.exists(results_path):  # complete: read it, write nothing
        return _finished(workdir, config_json)
    with workdir_lib.locked(workdir), workdir_lib.Preemption() as preemption:
        if os.path.exists(results_path):  # finished while this process waited to start
            return _finished(workdir, config_json)
        return _run(config, workdir, setup, config_json, preemption, started)


@dataclasses.dataclass
class Setup:
    """What the config check computes and the run uses."""

    method: methods.Method
    model_config: object
    tokenizer: object
    base_tx: object
    budget_info: dict
    lr_of: schedules.Schedule
    mesh: jax.sharding.Mesh


def _check_config(config) -> Setup:
    """Every configuration mistake that can be found without data stops here."""
    method = methods.get(config.method, config.methods.get(config.method))
    for key in ("data.root", "tokenizer"):
        section, _, name = key.rpartition(".")
        if not (config[section] if section else config)[name]:
            raise ValueError(f"config.{key} is required (see {config.data.benchmark} configs)")
    if config.data.bad_images not in ("error", "skip"):
        raise ValueError(
            f"config.data.bad_images={config.data.bad_images!r}; expected 'error' or 'skip'"
        )
    if not 0 <= config.data.max_bad_image_fraction <= 1:
        raise ValueError(
            f"config.data.max_bad_image_fraction={config.data.max_bad_image_fraction} is not a "
            "fraction in [0, 1]"
        )
    ratios = dict(config.mixture)
    for task in (0, 1):
        mixture.pool_batch_sizes(config.batch_size, ratios, task)
    model_config, tokenizer = model_and_tokenizer(config)
    profiling_instance(config, model_config)  # the method's setup checks its parameters
    base_tx = optimizer.adamw(
        b1=config.optimizer.b1, b2=config.optimizer.b2, eps=config.optimizer.eps,
        weight_decay=config.optimizer.weight_decay, clip_norm=config.optimizer.clip_norm,
        decay_convention=config.optimizer.decay_convention,
    )  # fmt: skip
    budget_info = task_budget(config, method, model_config, base_tx)
    lr_of = schedule_of(config, budget_info["steps_per_task"])
    mesh = sharding.make_mesh(**config.mesh)
    check_batch_divides(config, mesh)
    return Setup(method, model_config, tokenizer, base_tx, budget_info, lr_of, mesh)


def check_batch_divides(config, mesh) -> None:
    """Every batch the run shards over the mesh's batch axes divides over them."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    sizes = {"batch_size": config.batch_size}
    if not config.theta0.checkpoint:
        sizes["theta0.batch_size"] = config.theta0.batch_size
    for key, size in sizes.items():
        if size % shards:
            raise ValueError(
                f"config.{key}={size} does not split over the mesh's data x fsdp = {shards} devices"
            )


def _config_json(config) -> str:
    """The run's identity: its config with only its own method's block (other methods'
    hyperparameters, and methods added to the library later, do not change it)."""
    recorded = ml_collections.ConfigDict(config.to_dict())
    recorded.methods = {config.method: config.methods.get(config.method, {})}
    return json.dumps(json.loads(recorded.to_json_best_effort()), indent=2, sort_keys=True)


def _same_config_or_fresh(workdir: str, config_json: str) -> None:
    """Record the config in `workdir`; a different one is refused once the directory holds a
    run's state (a checkpoint or results), and replaced before that (a failed start)."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == config_json:
                return
        if _holds_state(workdir):
            raise ValueError(f"{workdir} holds a run with a different config ({path})")
        logging.info("%s: replacing the config of a start that made no checkpoint", path)
    workdir_lib.write_atomic(path, config_json)


def _holds_state(workdir: str) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.exists(os.path.join(workdir, "results.json")) or (
        os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
    )


def _finished(workdir: str, config_json: str) -> dict:
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        if f.read() != config_json:
            raise ValueError(f"{workdir} holds a run with a different config ({path})")
    logging.info("run in %s is complete; nothing to do", workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    print(format_table(results))
    return results


def _run(config, workdir, setup: Setup, config_json, preemption, started) -> dict:
    method, model_config, tokenizer = setup.method, setup.model_config, setup.tokenizer
    budget_info, lr_of, mesh = setup.budget_info, setup.lr_of, setup.mesh
    steps = budget_info["steps_per_task"]
    logging.info("%s", budget_report(config, budget_info, model_config))

    data = prepare_data(config)  # the last check: the data's paths and files
    _same_config_or_fresh(workdir, config_json)
    os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    image_size = model_config.vision.image_size
    ratios = dict(config.mixture)

    theta0_params = theta0.load_or_make(
        config, model_config, tokenizer, data.pool, config.theta0.cache_dir or data.root, mesh
    )
    graphdef = params_lib.split(abstract_clip(method.model_config(model_config)))[0]
    method.setup(methods.Context(
        config=config, workdir=workdir, model_config=model_config, graphdef=graphdef,
        tokenizer=tokenizer, forward=make_forward(graphdef), steps_per_task=steps, data=data,
        update_batches=functools.partial(_update_batches, config, data, tokenizer, image_size),
    ))  # fmt: skip
    start_params = method.init_params(theta0_params)
    tx = setup.base_tx
    evaluator = evaluate_lib.Evaluator(
        data.root, data.datasets, tokenizer, image_size, batch_size=config.eval.batch_size,
        subset_seed=config.seed,
    )  # fmt: skip
    step_key = np.asarray(jax.random.key_data(jax.random.key(
        mixture.derive_seed(config.seed, "method") % 2**32)))  # fmt: skip

    def fresh_state(params, method_state):
        opt_state = tx.init(trained(params, method))
        return ContinualState(np.zeros((), np.int32), params, opt_state, method_state, step_key)

    abstract = jax.eval_shape(lambda p: fresh_state(p, method.init_state(p)), start_params)
    state_sharding = shardings_of(abstract, mesh)
    step_fn = compile_step(graphdef, tx, method, mesh, state_sharding)

    def place(state):
        return jax.device_put(state, state_sharding, may_alias=False)

    eval_seconds = {}  # kind -> seconds of its latest evaluation in this process (for the ETA)

    def evaluate(params, subset: bool) -> dict:
        kind, start = "subset" if subset else "full", time.perf_counter()
        model = params_lib.merge(graphdef, params)
        per_dataset = evaluator.evaluate(model, subset=subset)
        eval_seconds[kind] = time.perf_counter() - start
        logging.info("evaluation (%s test sets) took %.1fs", kind, eval_seconds[kind])
        return dict(evaluator.summary(per_dataset), per_dataset=per_dataset, evaluation=kind)

    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"))
    latest = checkpoints.latest()
    if latest is not None:
        state, progress = checkpoints.restore(latest, abstract, state_sharding)
        progress.setdefault("bad_images", 0)
        logging.info("resuming from checkpoint %d: task %d, step %d", latest,
                     progress["task"], progress["step"])  # fmt: skip
    else:
        state = place(fresh_state(start_params, method.init_state(start_params)))
        zero_shot = evaluate(start_params, subset=False)
        zero_shot_subset = evaluate(start_params, subset=True)
        logging.info("zero-shot (full test sets): %s", _headline(zero_shot))
        progress = dict(task=0, step=0, saves=0, metric_lines=0, zero_shot_full=zero_shot,
                        trajectory=[zero_shot_subset], batch_sizes=[], bad_images=0)  # fmt: skip
        checkpoints.save(0, state, progress)

    resume_at = None
    if latest is not None:  # hide what a killed process logged after this checkpoint
        resume_at = (progress["task"] * steps + progress["step"] + 1, progress["task"] + 1)
    log = RunLogger(workdir, config, keep_lines=progress["metric_lines"], resume_at=resume_at)
    if latest is None:
        log.evaluation(zero_shot, 0)
    loop = Loop(config, workdir, steps, step_fn, lr_of, log, checkpoints, preemption,
                max_bad_images=int(config.data.max_bad_image_fraction * config.batch_size
                                   * steps * config.num_tasks),
                eval_seconds=eval_seconds)  # fmt: skip
    try:
        with preemption.deferred():
            for task in range(progress["task"], config.num_tasks):
                sizes = mixture.pool_batch_sizes(config.batch_size, ratios, task)
                update_ids, buffer_ids = mixture.task_pools(data.catalogue, data.tasks, task)
                offset = sum(b["pretraining"] * steps for b in progress["batch_sizes"][:task])
                if progress["step"] == 0:  # a task starts: the method picks its training weights
                    params = method.train_params(task, state.params, state.method_state)
                    opt_state = (state.opt_state if config.optimizer.carry_state
                                 else tx.init(trained(params, method)))  # fmt: skip
                    state = place(state.replace(params=params, opt_state=opt_state))
                batches = pipeline.TaskBatches(
                    catalogue=data.catalogue, update_ids=update_ids, buffer_ids=buffer_ids,
                    pretraining=data.pool if sizes["pretraining"] else None, batch_sizes=sizes,
                    steps=steps, seed=config.seed, task=task, pretraining_offset=offset,
                    tokenizer=tokenizer, image_size=image_size,
                    num_threads=config.data.num_threads, bad_images=config.data.bad_images,
                )  # fmt: skip
                state, progress = loop.train_task(task, batches, state, progress)
                params, method_state = method.end_of_task(task, state.params, state.method_state)
                state = place(state.replace(params=params, method_state=method_state))
                if not bool(_all_finite((state.params, state.method_state))):
                    _diverged(workdir, task, steps, state, progress, checkpoints,
                              where=f"after the end-of-task hook of {method.name}")  # fmt: skip
                last = task == config.num_tasks - 1
                if last or (task + 1) % config.eval.every_nth_task == 0:
                    point = evaluate(method.eval_params(task, params, method_state), subset=True)
                    point["task"] = task
                    progress["trajectory"].append(point)
                    log.evaluation(point, task + 1)
                    logging.info("after task %d (subset): %s", task, _headline(point))
                progress.update(task=task + 1, step=0)
                progress["batch_sizes"] = progress["batch_sizes"][:task] + [sizes]
                progress["saves"] += 1
                checkpoints.save(progress["saves"], state, progress)
                loop.stop_if_preempted(progress)
    finally:
        log.close()
        checkpoints.close()

    final_params = method.eval_params(config.num_tasks - 1, state.params, state.method_state)
    final = evaluate(final_params, subset=False)
    export_config, export_params = method.export_params(jax.device_get(final_params))
    export_graphdef = params_lib.split(abstract_clip(export_config))[0]
    models.export_hf(params_lib.merge(export_graphdef, export_params),
                     os.path.join(workdir, "model"), tokenizer=tokenizer)  # fmt: skip
    results = _results(progress, final, steps, config, evaluator)
    results.update(
        budget=budget_info,
        bad_images=dict(policy=config.data.bad_images, skipped=progress["bad_images"],
                        limit=loop.max_bad_images),
        wall_seconds_this_process=time.perf_counter() - started,
    )  # fmt: skip
    plots.write_all(results, [lr_of(k, s) for k in range(config.num_tasks) for s in range(steps)],
                    os.path.join(workdir, "plots"))  # fmt: skip
    workdir_lib.write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=1))
    print(format_table(results))
    return results


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every float entry of `tree` is finite."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]  # fmt: skip
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


def _update_batches(config, data, tokenizer, image_size, task, batch_size, num_batches):
    """`num_batches` batches of the update pool of `task` alone (e.g. for a Fisher pass)."""
    update_ids, _ = mixture.task_pools(data.catalogue, data.tasks, task)
    batches = pipeline.TaskBatches(
        catalogue=data.catalogue, update_ids=update_ids, buffer_ids=np.zeros(0, np.int64),
        pretraining=None, batch_sizes={"update": batch_size, "buffer": 0, "pretraining": 0},
        steps=num_batches, seed=config.seed, task=task, tokenizer=tokenizer,
        image_size=image_size, num_threads=config.data.num_threads,
    )  # fmt: skip
    for batch in batches.dataset(0):
        yield {"images": batch["images"], "token_ids": batch["token_ids"]}


@dataclasses.dataclass
class Loop:
    """The step loop of a task: logging, checkpoints, divergence, preemption, bad images."""

    config: ml_collections.ConfigDict
    workdir: str
    steps: int
    step_fn: object
    lr_of: schedules.Schedule
    log: RunLogger
    checkpoints: Checkpoints
    preemption: workdir_lib.Preemption
    max_bad_images: int  # undecodable images the run may skip (data.bad_images = "skip")
    # kind ("subset", "full") -> seconds of its latest evaluation in this process
    eval_seconds: dict = dataclasses.field(default_factory=dict)

    def train_task(self, task, batches, state, progress):
        config, steps = self.config, self.steps
        start_step = progress["step"]
        window_start, data_wait, last_logged = time.perf_counter(), 0.0, start_step
        iterator = iter(batches.dataset(start_step))
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            batch = next(iterator)
            data_wait += time.perf_counter() - t0
            self._count_bad_images(task, step, int(batch["skipped"]), progress)
            batch = {"images": batch["images"], "token_ids": batch["token_ids"]}
            state, metrics = self.step_fn(state, batch, self.lr_of(task, step))
            done = step + 1
            log_now = done % config.log_every == 0 or done == steps
            save_now = (config.checkpoint_every and done % config.checkpoint_every == 0
                        and done < steps)  # fmt: skip
            preempted = self.preemption.requested
            if log_now or save_now or preempted:  # never log or checkpoint a diverged state
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not metrics["finite"]:
                    _diverged(self.workdir, task, done, state, progress, self.checkpoints)
            if log_now:
                elapsed = time.perf_counter() - window_start
                rate = (done - last_logged) * batches.batch_size / elapsed
                record = dict(task=task, step=done, samples_per_second=rate,
                              data_wait_fraction=data_wait / elapsed, **metrics)  # fmt: skip
                self.log.step(record, global_step=task * steps + done)
                progress["metric_lines"] = self.log.lines
                logging.info(
                    "task %d step %d/%d | loss %.4f | lr %.2e | %.0f samples/s | data wait "
                    "%.0f%% | ETA task %.0fs | %s%s", task, done, steps, metrics["loss"],
                    metrics["learning_rate"], rate, 100 * data_wait / elapsed,
                    (steps - done) * batches.batch_size / rate,
                    self.run_progress(task, done, elapsed / (done - last_logged)),
                    f" | {progress['bad_images']} bad images skipped"
                    if progress["bad_images"] else "",
                )  # fmt: skip
                window_start, data_wait, last_logged = time.perf_counter(), 0.0, done
            if save_now or preempted:
                progress.update(task=task, step=done)
                progress["saves"] += 1
                self.checkpoints.save(progress["saves"], state, progress)
            if preempted:
                self.stop_if_preempted(progress)
        return state, progress

    def run_progress(self, task: int, done: int, seconds_per_step: float) -> str:
        """The whole stream's progress and time left: "run 540/1200 steps (45%) | ETA run 3m12s".

        Time left = the remaining training steps at the last log window's step time + the
        remaining evaluations (after each evaluated task, then the final full one) at the
        durations this process measured for their kind (a fresh run times both at zero-shot).
        A kind not timed yet (on a resumed run, until its first evaluation) counts as 0, and
        the ETA is then marked as a lower bound: "ETA run >3m12s"."""
        config, total = self.config, self.steps * self.config.num_tasks
        global_step = task * self.steps + done
        last, every = config.num_tasks - 1, config.eval.every_nth_task
        subsets = sum(k == last or (k + 1) % every == 0 for k in range(task, last + 1))
        pending = {"subset": subsets, "full": 1}  # this task's evaluation is still to come
        seconds = (total - global_step) * seconds_per_step
        seconds += sum(n * self.eval_seconds.get(kind, 0.0) for kind, n in pending.items())
        bound = ">" if any(kind not in self.eval_seconds for kind in pending) else ""
        return (f"run {global_step}/{total} steps ({100 * global_step / total:.0f}%) | "
                f"ETA run {bound}{format_duration(seconds)}")  # fmt: skip

    def stop_if_preempted(self, progress):
        """After a checkpoint: stop if SIGTERM came (the checkpoint holds the position)."""
        if self.preemption.requested:
            where = f"checkpoint {progress['saves']} at task {progress['task']} step "
            where += str(progress["step"])
            logging.warning("SIGTERM: %s; stopping", where)
            raise workdir_lib.Preempted(f"SIGTERM: stopped after {where}")

    def _count_bad_images(self, task, step, skipped, progress):
        if not skipped:
            return
        progress["bad_images"] += skipped
        if progress["bad_images"] > self.max_bad_images:
            raise ValueError(
                f"task {task} step {step}: {progress['bad_images']} undecodable images "
                f"skipped, more than config.data.max_bad_image_fraction="
                f"{self.config.data.max_bad_image_fraction} of the run's samples allows "
                f"({self.max_bad_images}); the warnings above name the files"
            )


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m: minutes and seconds under an hour, hours and minutes above."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _diverged(workdir, task, step, state, progress, checkpoints, where=None):
    """Abort a diverged run, after saving its state aside for inspection (spec §7: the run
    aborts after writing a checkpoint). The state goes to a new entry of `diverged/` (one per
    divergence: a rerun that diverges again adds another), not to `checkpoints/`, so a rerun
    resumes from the last good checkpoint, not from non-finite weights."""
    aside = Checkpoints(os.path.join(workdir, "diverged"), max_to_keep=None)
    index = (aside.latest() or 0) + 1
    aside.save(index, state, dict(progress, task=task, step=step))
    aside.close()
    if where:
        what = f"non-finite parameters or method state {where} (step {step})"
    else:
        what = f"non-finite loss or gradient norm at step {step}"
    raise FloatingPointError(
        f"task {task}: {what}. The state at this step is saved in "
        f"{os.path.join(workdir, 'diverged', str(index))}; the last good checkpoint is "
        f"{checkpoints.latest()} in {os.path.join(workdir, 'checkpoints')} (a rerun resumes "
        "from it and, with the same config, diverges again: lower the learning rate or raise "
        "the gradient clipping and start in a new workdir)."
    )


def _results(progress, final, steps, config, evaluator) -> dict:
    trajectory = [progress["zero_shot_full"]] + progress["trajectory"][1:]
    points = [{k: p[k] for k in METRIC_KEYS} | {"evaluation": p["evaluation"]} for p in trajectory]
    curves = {k: [p[k] for p in trajectory] for k in METRIC_KEYS}
    return {
        "final": {k: final[k] for k in METRIC_KEYS},
        "trajectory": points,
        "area_under_trajectory": {
            k: evaluate_lib.area_under_trajectory(v) for k, v in curves.items()
        },
        "per_dataset": {
            "zero_shot_full": progress["zero_shot_full"]["per_dataset"],
            "tasks_subset": [p["per_dataset"] for p in progress["trajectory"][1:]],
            "final_full": final["per_dataset"],
        },
        "steps_per_task": steps,
        "samples_per_task": steps * config.batch_size,
        "batch_sizes": progress["batch_sizes"],
        "subset_indices": evaluator.subset_manifest(),
    }


def format_table(results: dict) -> str:
    rows = [("zero-shot (full)", results["trajectory"][0])]
    rows += [(f"after task {i} (subset)", p) for i, p in enumerate(results["trajectory"][1:])]
    rows.append(("final (full)", results["final"]))
    lines = [f"{'':26s} {'A_KA':>8s} {'A_ZS':>8s} {'GM':>8s}"]
    for name, p in rows:
        lines.append(
            f"{name:26s} {p['knowledge_accumulation']:8.2f} {p['zero_shot_retention']:8.2f} "
            f"{p['geometric_mean']:8.2f}"
        )
    return "\n".join(lines)
