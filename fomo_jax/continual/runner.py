"""The continual runner: θ0, then for each task train, end-of-task hook, evaluate, checkpoint.

Spec §7.1 (loop), §8.1 (weight bookkeeping), §10 (evaluation), §11 (checkpoints). The runner
sets a stream up (config check, budget, data, θ0, the method, the family's evaluator) and runs
it as one job of the one training loop (`fomo_jax.continual.loop`), which checkpoints, resumes,
logs and catches divergence; θ0, when made here, is itself a job of that loop (`theta0`).
Everything model-specific comes from the model family `config.family` names
(`fomo_jax.families`). The run is a pure function of its config, so a killed run resumes to
exactly the result of an uninterrupted one.

Work directory: `config.json`, `metrics.jsonl` (per logged step), `results.json` (`final` and
`trajectory`, metrics only), `plots/` (A_KA-A_ZS trajectory, per-dataset heatmap, learning
rate), `checkpoints/` (indexed by the global step; the zero-shot start and every task's end
are kept), `model/` (the final model, exported by the family).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from fomo_jax import budget, distributed, families, models, profiling, schedules, sharding
from fomo_jax import evaluate as evaluate_lib
from fomo_jax.continual import checkpoints as checkpoints_lib
from fomo_jax.continual import loop as loop_lib
from fomo_jax.continual import methods, plots, theta0
from fomo_jax.continual import workdir as workdir_lib
from fomo_jax.data import (
    fif,
    fif_synth,
    mixture,
    pipeline,
    records,
    registry,
    streams,
    vlm_stream,
    webdataset,
)
from fomo_jax.families.base import Family
from fomo_jax.train import optimizer


@dataclasses.dataclass
class Data:
    """A run's data: the benchmark's datasets, the stream's tasks, the training catalogue and
    the pretraining pool; what a method may read of it (`families.base.Data`)."""

    root: str
    datasets: dict
    catalogue: mixture.Catalogue
    pool: webdataset.WebDatasetSource | records.RecordSource | pipeline.DecodedSource
    tasks: list
    config: ml_collections.ConfigDict
    batch_keys: tuple[str, ...]
    tokenizer: object
    image_size: int
    rows: object = None  # this process's rows of each global batch (None: all; one process)

    @property
    def whole_batches(self) -> bool:
        """Decoded samples are cheap: each batch is built whole (`TaskBatches`)."""
        return bool(self.config.data.get("decode_once", False))

    def task_batches(self, task: int, batch_sizes: dict, steps: int, *, pretraining_offset=0):
        """The batches of `task` (a pure function of (seed, task, step))."""
        update_ids, buffer_ids = mixture.task_pools(self.catalogue, self.tasks, task)
        return pipeline.TaskBatches(
            catalogue=self.catalogue, update_ids=update_ids, buffer_ids=buffer_ids,
            pretraining=self.pool if batch_sizes["pretraining"] else None,
            batch_sizes=batch_sizes, steps=steps, seed=self.config.seed, task=task,
            pretraining_offset=pretraining_offset, tokenizer=self.tokenizer,
            image_size=self.image_size, num_threads=self.config.data.num_threads,
            bad_images=self.config.data.bad_images, rows=self.rows,
            whole_batches=self.whole_batches,
        )  # fmt: skip

    def update_batches(self, task: int, batch_size: int, num_batches: int):
        """`num_batches` batches of the update pool of `task` alone (e.g. a Fisher pass), whole on
        every process (host-side work)."""
        update_ids, _ = mixture.task_pools(self.catalogue, self.tasks, task)
        batches = pipeline.TaskBatches(
            catalogue=self.catalogue, update_ids=update_ids, buffer_ids=np.zeros(0, np.int64),
            pretraining=None, batch_sizes={"update": batch_size, "buffer": 0, "pretraining": 0},
            steps=num_batches, seed=self.config.seed, task=task, tokenizer=self.tokenizer,
            image_size=self.image_size, num_threads=self.config.data.num_threads,
            whole_batches=self.whole_batches,
        )  # fmt: skip
        for batch in batches.dataset(0):
            yield {k: batch[k] for k in self.batch_keys}

    def pretraining_texts(self, count: int) -> list[str]:
        """The first caption of each of the last `count` samples of the pretraining pool."""
        size = len(self.pool)
        return [pipeline.example_texts(self.pool[i])[0]
                for i in range(size - min(count, size), size)]  # fmt: skip


def benchmark_datasets(config) -> dict:
    """{key: DatasetInfo} of the config's benchmark (fif_synth is generated first if missing;
    it is deterministic): the datasets a run trains on and evaluates."""
    d = config.data
    if d.benchmark == "fif_synth":
        with distributed.primary_first("fif_synth generated"):  # one writer; then it exists
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


def family_of(config) -> Family:
    """The model family `config.family` names, set up by the config (`config.loss`)."""
    return families.get(config.get("family", "clip")).configured(config)


def prepare_data(config, family: Family | None = None, model_config=None, tokenizer=None,
                 mesh=None) -> Data:  # fmt: skip
    """The benchmark's datasets, the stream's tasks, the training catalogue and the pool
    (batches for the family's model; by default the config's family, model and tokenizer).
    With several processes, each loads only its rows of the global batches on `mesh`."""
    if family is None:
        family = family_of(config)
        model_config = family.model_config(config)
        tokenizer = family.tokenizer(config, model_config)
    rows = None
    if distributed.multiprocess():
        rows = distributed.local_rows(sharding.batch_sharding(mesh), config.batch_size)
        logging.info("process %d loads rows %d-%d of every global batch of %d",
                     jax.process_index(), rows[0], rows[-1], config.batch_size)  # fmt: skip
    d = config.data
    if d.benchmark == "vlm_synth":  # the synthetic vision-language world (generated)
        return vlm_stream.prepare(config, family, model_config, tokenizer, rows)
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
    if d.get("decode_once", False):  # small images: decoded once, held in memory
        sources = {key: pipeline.DecodedSource(s) for key, s in sources.items()}
        pool = pipeline.DecodedSource(pool)
    return Data(d.root, datasets, mixture.Catalogue(sources), pool, tasks, config,
                family.batch_keys, tokenizer, family.image_size(model_config), rows)  # fmt: skip


def task_budget(config, method, model_config, tx, setup_method=None) -> dict:
    """Steps per task and where they come from (spec §5): `config.steps_per_task` or
    `config.n_samples` as given, or the stream budget of `config.budget` ("paper": Table 4;
    "measured": MAFs of the compiled steps). With `config.equal_compute`, a given step count is
    full fine-tuning's, and the method gets it x MAF_finetune / MAF_method (MAFs again from
    `config.budget`), so methods compare at equal compute on any stream length.
    `setup_method(name)`: method `name` set up for compiling its step (default:
    `profiling_instance`)."""
    if setup_method is None:
        setup_method = lambda name: profiling_instance(config, model_config, name)  # noqa: E731
    mafs = {}
    if config.budget == "measured":  # MAF of this method's step relative to full FT
        if not (config.steps_per_task or config.n_samples) or config.equal_compute:
            profile, full = (
                profiling.profile_method(setup_method(name), model_config, tx, config.batch_size)
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


def profiling_instance(config, model_config, name=None, tokenizer=None) -> methods.Method:
    """Method `name` (default: the configured one) set up without data, for compiling (not
    running) its step."""
    name = name or config.method
    method = methods.get(name, config.methods.get(name))
    family = family_of(config)
    if tokenizer is None:
        tokenizer = family.tokenizer(config, model_config)
    method.setup(methods.Context(
        config=config, family=family, model_config=model_config, tokenizer=tokenizer,
        data=methods.NoData(), workdir="",
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

    model = None
    if hasattr(model_config, "vision") and hasattr(model_config, "text"):
        model = infer_openclip_name(model_config)  # a θ0 checkpoint is named by its shapes
    if model is None:
        model = config.theta0.checkpoint or config.model.name
    return budget.startup_report(budget_info, model=model, budget=config.budget)


def model_and_tokenizer(config):
    """The model config (from θ0's checkpoint when one is given) and its tokenizer."""
    family = family_of(config)
    model_config = family.model_config(config)
    return model_config, family.tokenizer(config, model_config)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Run (or resume, or report) the continual experiment of `config` in `workdir`.

    The whole config is checked before anything is written, so a failed start leaves the work
    directory reusable; then the run holds the directory's lock (one writer at a time) and
    turns SIGTERM into a checkpoint at the current step (`workdir.Preempted`)."""
    started = time.perf_counter()
    setup = _check_config(config)
    config_json = _config_json(config)
    results_path = os.path.join(workdir, "results.json")
    checkpoints_lib.check_format(os.path.join(workdir, "checkpoints"))  # a run made before
    if os.path.exists(results_path):  # complete: read it, write nothing
        return _finished(workdir, config_json, setup.family)
    # One writer holds the lock (process 0 of a multi-process run).
    lock = workdir_lib.locked(workdir) if distributed.primary() else contextlib.nullcontext()
    with lock, workdir_lib.Preemption():
        distributed.barrier("workdir locked")
        if os.path.exists(results_path):  # finished while this process waited to start
            return _finished(workdir, config_json, setup.family)
        return _run(config, workdir, setup, config_json, started)


@dataclasses.dataclass
class Setup:
    """What the config check computes and the run uses."""

    family: Family
    method: methods.Method
    model_config: object
    tokenizer: object
    base_tx: object
    budget_info: dict
    lr_of: schedules.Schedule
    mesh: jax.sharding.Mesh


def _check_config(config) -> Setup:
    """Every configuration mistake that can be found without data stops here."""
    family = family_of(config)
    method = methods.get(config.method, config.methods.get(config.method))
    method.check_family(family)
    check_budget_family(config, family)
    for key in ("data.root", "tokenizer"):
        section, _, name = key.rpartition(".")
        if not (config[section] if section else config)[name]:
            raise ValueError(f"config.{key} is required (see {config.data.benchmark} configs)")
    check_theta0(config)
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
    model_config = family.model_config(config)
    tokenizer = family.tokenizer(config, model_config)

    def setup_method(name):
        return profiling_instance(config, model_config, name, tokenizer)

    setup_method(config.method)  # the method's setup checks its parameters and the family
    base_tx = optimizer.build(config.optimizer)
    budget_info = task_budget(config, method, model_config, base_tx, setup_method)
    lr_of = schedule_of(config, budget_info["steps_per_task"])
    mesh = sharding.make_mesh(**config.mesh)
    check_batch_divides(config, mesh)
    return Setup(family, method, model_config, tokenizer, base_tx, budget_info, lr_of, mesh)


def check_budget_family(config, family) -> None:
    """The paper's Table 4 (`budget="paper"`) holds CLIP's MAFs; another family's steps come
    from its own compiled step (`budget="measured"`) or are given."""
    steps_given = config.get("steps_per_task") or config.get("n_samples")
    uses_table = not steps_given or config.get("equal_compute")
    if family.name != "clip" and config.budget == "paper" and uses_table:
        raise ValueError(
            f"config.budget='paper' is the paper's Table 4, measured for CLIP; the "
            f"{family.name} family needs config.budget='measured' (MAFs of its compiled steps) "
            "or config.steps_per_task without config.equal_compute"
        )


def check_theta0(config) -> None:
    """Stop a run that would silently start from a θ0 made here instead of a checkpoint.

    A config with `theta0.make` (`configs/fif.py`) needs `theta0.checkpoint`, or
    `theta0.make=True` to pretrain θ0 from scratch on the pool, not both. Configs without the
    key (fif_synth) make θ0 whenever no checkpoint is given, as they always did.
    """
    theta0 = config.get("theta0")
    if theta0 is None or "make" not in theta0:
        return
    if theta0.make and theta0.checkpoint:
        raise ValueError(
            f"config.theta0.checkpoint={theta0.checkpoint!r} and config.theta0.make=True: θ0 is "
            "either that checkpoint or made here, not both; drop one of them"
        )
    if not theta0.make and not theta0.checkpoint:
        raise ValueError(
            "config.theta0.checkpoint is required: the benchmark starts from a pretrained CLIP "
            "(--config.theta0.checkpoint=PATH, an OpenCLIP file or a HF CLIP directory, e.g. "
            "OpenCLIP ViT-B-16 laion2b_s34b_b88k). To pretrain θ0 from scratch on the "
            "pretraining pool instead, set --config.theta0.make=True"
        )


def check_batch_divides(config, mesh) -> None:
    """Every batch the run shards over the mesh's batch axes divides over them."""
    shards = sharding.batch_shards(mesh)
    sizes = {"batch_size": config.batch_size, "eval.batch_size": config.eval.batch_size}
    if not config.theta0.checkpoint:
        sizes["theta0.batch_size"] = config.theta0.batch_size
    for key, size in sizes.items():
        if size % shards:
            raise ValueError(
                f"config.{key}={size} does not split over the mesh's batch axes (data x fsdp x "
                f"fsdp_transpose = {shards} devices)"
            )


def _config_json(config) -> str:
    """The run's identity: its config with only its own method's block (other methods'
    hyperparameters, and methods added to the library later, do not change it), without where
    it runs (`mesh`, `resume_on_new_mesh`: a checkpoint records its mesh, and the loop refuses
    another one unless asked), where its decoded test images are kept (`eval.cache_dir`) and
    how its images are read (`data.num_threads`, `data.decode_once`: the same batches); the
    default `loss` (and `loss_chunk_size` but for a chunked loss) and the model's memory
    levers at their defaults (`model.remat`, `model.scan`) are left out too (runs made before
    those keys resume)."""
    recorded = ml_collections.ConfigDict(models.drop_default_memory_options(config.to_dict()))
    recorded.methods = {config.method: config.methods.get(config.method, {})}
    for key in ("mesh", "resume_on_new_mesh"):
        if key in recorded:
            del recorded[key]
    for group, key in (("eval", "cache_dir"), ("data", "num_threads"), ("data", "decode_once")):
        if key in recorded.get(group, {}):
            del recorded[group][key]
    if recorded.get("loss") == "clip":  # the default loss: config.json as before the key
        del recorded["loss"]
    if not recorded.get("loss", "").endswith("_chunked") and "loss_chunk_size" in recorded:
        del recorded["loss_chunk_size"]  # read by the chunked losses only
    return json.dumps(json.loads(recorded.to_json_best_effort()), indent=2, sort_keys=True)


def _finished(workdir: str, config_json: str, family: Family) -> dict:
    path = os.path.join(workdir, "config.json")
    with open(path) as f:
        if f.read() != config_json:
            raise ValueError(f"{workdir} holds a run with a different config ({path})")
    logging.info("run in %s is complete; nothing to do", workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    print(format_table(results, family.metric_keys))
    return results


def _headline(summary: dict, keys) -> str:
    return " | ".join(f"{k} {summary[k]:.2f}" for k in keys)


def _run(config, workdir, setup: Setup, config_json, started) -> dict:
    family, method, model_config = setup.family, setup.method, setup.model_config
    budget_info, lr_of, tokenizer = setup.budget_info, setup.lr_of, setup.tokenizer
    steps = budget_info["steps_per_task"]
    keys = family.metric_keys
    logging.info("%s", budget_report(config, budget_info, model_config))

    data = prepare_data(config, family, model_config, tokenizer, setup.mesh)  # the last check
    if distributed.primary():
        workdir_lib.same_config_or_fresh(workdir, config_json)
        os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
    distributed.barrier("config recorded")
    ratios = dict(config.mixture)

    cache_dir = config.theta0.cache_dir or data.root
    if config.data.benchmark == "vlm_synth":  # θ0 by the staged recipe
        theta0_params = vlm_stream.load_or_make_theta0(config, family, model_config, data,
                                                       cache_dir, setup.mesh)  # fmt: skip
    else:
        theta0_params = theta0.load_or_make(config, family, model_config, data, cache_dir,
                                            setup.mesh)  # fmt: skip
    method.setup(methods.Context(config=config, family=family, model_config=model_config,
                                 tokenizer=tokenizer, data=data, workdir=workdir,
                                 steps_per_task=steps))  # fmt: skip
    evaluator = family.evaluator(
        config, data, model_config, tokenizer, mesh=setup.mesh,
        cache_dir=config.eval.get("cache_dir") or os.path.join(workdir, "eval_images"),
    )  # fmt: skip
    eval_seconds = {}  # kind -> seconds of its latest evaluation in this process (for the ETA)

    def evaluate(params, subset: bool) -> dict:
        kind, start = "subset" if subset else "full", time.perf_counter()
        point = evaluator.evaluate(method.graphdef, params, subset=subset)
        eval_seconds[kind] = time.perf_counter() - start
        logging.info("evaluation (%s test sets) took %.1fs", kind, eval_seconds[kind])
        return dict(point, evaluation=kind)

    def zero_shot(params) -> dict:
        full = evaluate(params, subset=False)
        logging.info("zero-shot (full test sets): %s", _headline(full, keys))
        return dict(zero_shot_full=full, trajectory=[evaluate(params, subset=True)])

    def after_task(task, params) -> dict:
        point = dict(evaluate(params, subset=True), task=task)
        logging.info("after task %d (subset): %s", task, _headline(point, keys))
        return point

    def task_batches(task, record):
        sizes = mixture.pool_batch_sizes(config.batch_size, ratios, task)
        offset = sum(b["pretraining"] * steps for b in record["batch_sizes"][:task])
        return data.task_batches(task, sizes, steps, pretraining_offset=offset)

    job = loop_lib.Job(
        workdir=workdir, family=family, method=method, tx=setup.base_tx, mesh=setup.mesh,
        steps=steps, num_tasks=config.num_tasks, lr_of=lr_of, batches=task_batches,
        seed=mixture.derive_seed(config.seed, "method"), log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        lr_multipliers=dict(config.optimizer.get("lr_multipliers") or {}),
        carry_optimizer_state=config.optimizer.carry_state,
        max_bad_images=int(config.data.max_bad_image_fraction * config.batch_size * steps
                           * config.num_tasks),
        bad_images_note=f"config.data.max_bad_image_fraction={config.data.max_bad_image_fraction}"
                        " of the run's samples",
        config=config, zero_shot=zero_shot, after_task=after_task,
        eval_every_nth_task=config.eval.every_nth_task, final_evaluation=True,
        eval_seconds=eval_seconds, resume_on_new_mesh=config.get("resume_on_new_mesh", False),
    )  # fmt: skip
    state, record = loop_lib.train(job, method.init_params(theta0_params))

    params, method_state = state.params, state.method_state
    if distributed.multiprocess():  # the weights sharded across hosts: a full copy on each
        params, method_state = distributed.to_host((params, method_state))
    final_params = method.eval_params(config.num_tasks - 1, params, method_state)
    final = evaluate(final_params, subset=False)
    if not distributed.primary():  # the others wait for the writer's files
        distributed.barrier("results written")
        with open(os.path.join(workdir, "results.json")) as f:
            return json.load(f)
    export_config, export_params = method.export_params(jax.device_get(final_params))
    family.export(export_params, export_config, os.path.join(workdir, "model"), tokenizer)
    results = _results(record, final, steps, config, evaluator, keys)
    results.update(
        budget=budget_info,
        bad_images=dict(policy=config.data.bad_images, skipped=record["bad_images"],
                        limit=job.max_bad_images),
        wall_seconds_this_process=time.perf_counter() - started,
    )  # fmt: skip
    plots.write_all(results, [lr_of(k, s) for k in range(config.num_tasks) for s in range(steps)],
                    os.path.join(workdir, "plots"))  # fmt: skip
    workdir_lib.write_atomic(os.path.join(workdir, "results.json"), json.dumps(results, indent=1))
    distributed.barrier("results written")
    print(format_table(results, keys))
    return results


def _results(record, final, steps, config, evaluator, keys) -> dict:
    trajectory = [record["zero_shot_full"]] + record["trajectory"][1:]
    points = [{k: p[k] for k in keys} | {"evaluation": p["evaluation"]} for p in trajectory]
    curves = {k: [p[k] for p in trajectory] for k in keys}
    return {
        "final": {k: final[k] for k in keys},
        "trajectory": points,
        "area_under_trajectory": {
            k: evaluate_lib.area_under_trajectory(v) for k, v in curves.items()
        },
        "per_dataset": {
            "zero_shot_full": record["zero_shot_full"]["per_dataset"],
            "tasks_subset": [p["per_dataset"] for p in record["trajectory"][1:]],
            "final_full": final["per_dataset"],
        },
        "steps_per_task": steps,
        "samples_per_task": steps * config.batch_size,
        "batch_sizes": record["batch_sizes"],
        "subset_indices": evaluator.subset_manifest(),
    }


TABLE_NAMES = {"knowledge_accumulation": "A_KA", "zero_shot_retention": "A_ZS",
               "geometric_mean": "GM"}  # fmt: skip


def format_table(results: dict, keys=None) -> str:
    keys = keys or tuple(results["final"])
    rows = [("zero-shot (full)", results["trajectory"][0])]
    rows += [(f"after task {i} (subset)", p) for i, p in enumerate(results["trajectory"][1:])]
    rows.append(("final (full)", results["final"]))
    lines = [f"{'':26s} " + " ".join(f"{TABLE_NAMES.get(k, k)[:8]:>8s}" for k in keys)]
    for name, p in rows:
        lines.append(f"{name:26s} " + " ".join(f"{p[k]:8.2f}" for k in keys))
    return "\n".join(lines)
