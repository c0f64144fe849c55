"""Evaluate any CLIP checkpoint on a config's benchmark, the way a run's `final` is evaluated.

    fomo-jax eval --config=fif_synth:smoke --model=runs/x/model --workdir=runs/x_eval
    fomo-jax eval --config=fif --config.data.root=/data/fif --model=ViT-B-16.safetensors
    fomo-jax eval --config=fif_synth --model=runs/x --step=6      # a checkpoint of a run

`model` is a HF CLIP directory, an OpenCLIP state-dict file, a run's `model/` (or the run
directory itself, which means its `model/`), or a run directory with `step`: the orbax
checkpoint `<run>/checkpoints/<step>` (the folder name: the run's global step; the zero-shot
start is 0 and task k ends at (k + 1) x steps per task), rebuilt from the run's `config.json`
and evaluated with the weights its method reports (`Method.eval_params`), as the runner
evaluates its final model. Every dataset of the config's
benchmark is scored on its full test set with the runner's tokenizer, image size (the model's)
and batch size. Writes `<workdir>/eval.json` (A_KA, A_ZS, GM, per-dataset scores and what was
evaluated) and prints the table. Nothing is written next to the model.
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
import orbax.checkpoint as ocp

from fomo_jax import evaluate as evaluate_lib
from fomo_jax import models, sharding
from fomo_jax import params as params_lib
from fomo_jax.continual import runner
from fomo_jax.continual import workdir as workdir_lib
from fomo_jax.families import clip as clip_family
from fomo_jax.models.clip import CLIP
from fomo_jax.tokenizer import load_tokenizer
from fomo_jax.train import optimizer
from fomo_jax.train.step import TrainState, shardings_of, trained

MODEL_FORMS = (
    "a HF CLIP directory (config.json + model.safetensors), an OpenCLIP checkpoint file, a "
    "run's model/ directory, or a run directory (with step= for one of its checkpoints)"
)


def evaluate_model(
    config: ml_collections.ConfigDict,
    model: str,
    workdir: str,
    *,
    step: int | None = None,
    config_name: str | None = None,
) -> dict:
    """Score `model` on the full test sets of `config`'s benchmark; write `<workdir>/eval.json`.

    Returns the written record: knowledge_accumulation, zero_shot_retention, geometric_mean
    (percent), per_dataset ({dataset: {"accuracy"} or {"recall@1", "recall@5"}}), and what was
    evaluated (model path, checkpoint step and its task/step, config name, benchmark).
    `config_name` is recorded only (e.g. the --config string of the command line).
    """
    if config.data.benchmark == "vlm_synth":
        return _evaluate_vlm(config, model, workdir, step=step, config_name=config_name)
    started = time.perf_counter()
    loaded = load_model(model, step, dtype=config.model.dtype,
                        attention_implementation=config.model.attention_implementation)  # fmt: skip
    clip = loaded.model
    tokenizer = load_tokenizer(config.tokenizer, context_length=clip.config.text.context_length)
    _check_vocabulary(tokenizer, clip, config.tokenizer, loaded.path)
    root, datasets = benchmark_datasets(config)
    image_size = clip.config.vision.image_size
    logging.info("eval: decoding the test sets of %d datasets (%s, %dx%d images)",
                 len(datasets), root, image_size, image_size)  # fmt: skip
    evaluator = evaluate_lib.Evaluator(
        root, datasets, tokenizer, image_size, info_dir=config.data.info_dir,
        batch_size=config.eval.batch_size, subset_seed=config.seed,
    )  # fmt: skip
    logging.info("eval: embedding and scoring %s", loaded.path)
    per_dataset = evaluator.evaluate(clip, subset=False)
    record = dict(
        evaluator.summary(per_dataset),
        per_dataset=per_dataset,
        evaluation="full",
        model=os.path.abspath(loaded.path),
        step=step,
        checkpoint=loaded.checkpoint,
        config=config_name,
        benchmark=config.data.benchmark,
        data_root=os.path.abspath(root),
        tokenizer=str(config.tokenizer),
        wall_seconds=time.perf_counter() - started,
    )
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.write_atomic(os.path.join(workdir, "eval.json"), json.dumps(record, indent=1))
    logging.info("eval: %s in %.1fs -> %s", _headline(record),
                 record["wall_seconds"], os.path.join(workdir, "eval.json"))  # fmt: skip
    print(format_eval_table(record, datasets))
    return record


def _evaluate_vlm(config, model: str, workdir: str, *, step, config_name) -> dict:
    """A VLM (a LLaVA directory, a run's `model/`, or the run directory) on the synthetic
    world's evaluation (`fomo_jax.evaluate_vlm`), as a vlm_synth run evaluates its final model."""
    from fomo_jax import evaluate_vlm
    from fomo_jax.data import vlm_synth
    from fomo_jax.models import hf_lm

    if step is not None:
        raise ValueError("--step: evaluating a VLM run's checkpoint is not supported; evaluate "
                         "its exported model (the run directory or its model/)")  # fmt: skip
    started = time.perf_counter()
    path = os.path.join(model, "model") if is_run_dir(model) else model
    vlm = hf_lm.load_pretrained(path)
    graphdef, params = params_lib.split(vlm)
    evaluator = evaluate_vlm.Evaluator(
        vlm_synth.World(config.data.synth_seed), vlm_synth.WordTokenizer(), vlm.config,
        items=config.eval.kinds.to_dict(), skills=tuple(config.data.skills),
        batch_size=config.eval.batch_size,
    )  # fmt: skip
    result = evaluator.evaluate(graphdef, params, subset=False)
    record = dict(result, evaluation="full", model=os.path.abspath(path), step=None,
                  config=config_name, benchmark=config.data.benchmark,
                  wall_seconds=time.perf_counter() - started)  # fmt: skip
    os.makedirs(workdir, exist_ok=True)
    workdir_lib.write_atomic(os.path.join(workdir, "eval.json"), json.dumps(record, indent=1))
    lines = [record["model"], f"{'evaluation':28s} {'score':>8s}"]
    lines += [f"{kind:28s} {entry['accuracy']:8.2f}"
              for kind, entry in sorted(result["per_dataset"].items())]  # fmt: skip
    lines += [f"{key:28s} {record[key]:8.2f}" for key in evaluate_vlm.METRIC_KEYS]
    print("\n".join(lines))
    return record


def _headline(record: dict) -> str:
    return " | ".join(f"{k} {record[k]:.2f}" for k in clip_family.METRIC_KEYS)


def format_eval_table(record: dict, datasets: dict) -> str:
    """Per-dataset scores (accuracy, or R@5 for retrieval) by role, then A_KA / A_ZS / GM."""
    lines = [record["model"], f"{'dataset':28s} {'role':11s} {'score':>8s}"]
    for key, entry in sorted(record["per_dataset"].items(),
                             key=lambda item: (datasets[item[0]].role, item[0])):  # fmt: skip
        lines.append(f"{key:28s} {datasets[key].role:11s} {evaluate_lib.headline(entry):8.2f}")
    lines.append(f"{'':41s} {'A_KA':>8s} {'A_ZS':>8s} {'GM':>8s}")
    lines.append(
        f"{'full test sets':41s} {record['knowledge_accumulation']:8.2f} "
        f"{record['zero_shot_retention']:8.2f} {record['geometric_mean']:8.2f}"
    )
    return "\n".join(lines)


def benchmark_datasets(config) -> tuple[str, dict]:
    """(data root, {key: DatasetInfo}) of the config's benchmark, as the runner picks them."""
    return config.data.root, runner.benchmark_datasets(config)


# ------------------------------------------------------------------------------ loading


@dataclasses.dataclass
class Loaded:
    model: CLIP
    path: str  # what was read: a checkpoint file or directory, or a run's checkpoint folder
    checkpoint: dict | None = None  # a run checkpoint's position: task, step in task, method


def load_model(path: str, step: int | None = None, **numerics) -> Loaded:
    """The CLIP at `path` (see the module docstring for the accepted forms); `numerics` are
    `dtype` and `attention_implementation`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path!r} does not exist; expected {MODEL_FORMS}")
    run_dir = is_run_dir(path)
    if step is not None:
        if not run_dir:
            raise ValueError(f"step={step} needs a run directory (with checkpoints/); "
                             f"{path!r} is not one")  # fmt: skip
        return load_run_checkpoint(path, step, **numerics)
    if run_dir:
        exported = os.path.join(path, "model")
        if not os.path.isfile(os.path.join(exported, "config.json")):
            raise FileNotFoundError(
                f"run {path!r} has no exported model/ (not finished); pass step= one of its "
                f"checkpoints {checkpoint_steps(path)}"
            )
        path = exported
    elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} holds no config.json; expected {MODEL_FORMS}")
    model = models.load_pretrained(path, **numerics)
    if not isinstance(model, CLIP):
        raise ValueError(f"{path}: a {type(model).__name__}, not a CLIP; eval scores CLIPs")
    return Loaded(model, path)


def is_run_dir(path: str) -> bool:
    """Whether `path` is a continual run's work directory (config.json and checkpoints/)."""
    return os.path.isdir(os.path.join(path, "checkpoints")) and os.path.isfile(
        os.path.join(path, "config.json")
    )


def checkpoint_steps(run_dir: str) -> list[int]:
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def read_run_config(run_dir: str) -> ml_collections.ConfigDict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"run {run_dir!r} has no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_run_checkpoint(run_dir: str, step: int, **numerics) -> Loaded:
    """The weights a run reports at checkpoint `step`: the state restored into the layout the
    runner built from the same config.json, then `Method.eval_params` of the last finished
    task (θ0 itself at checkpoint 0; mid-task, what the method deploys at that point)."""
    steps = checkpoint_steps(run_dir)
    if step not in steps:
        raise ValueError(f"run {run_dir!r} has no checkpoint {step}; it has {steps}")
    run_config = read_run_config(run_dir)
    model_config, _ = runner.model_and_tokenizer(run_config)
    model_config = model_config.replace(**numerics)
    method = runner.profiling_instance(run_config, model_config)
    abstract = _abstract_state(run_config, method, model_config)
    mesh = sharding.make_mesh()  # any mesh: config.json does not record the run's (orbax reshards)
    state, position = _restore(os.path.join(run_dir, "checkpoints"), step, abstract, mesh,
                               method.ctx.family.rules)  # fmt: skip
    task, step_in_task = position["task"], position["step"]
    if task == 0 and step_in_task == 0:  # the stream's start: θ0 (with the method's init)
        params = state.params
    else:  # after task t-1's end-of-task hook (step 0), or inside task t
        reported = task - 1 if step_in_task == 0 else task
        params = method.eval_params(reported, state.params, state.method_state)
    graphdef = method.graphdef
    where = dict(task=task, step_in_task=step_in_task, method=method.name)
    logging.info("eval: checkpoint %d of %s: task %d, step %d (%s)", step, run_dir, task,
                 step_in_task, method.name)  # fmt: skip
    return Loaded(params_lib.merge(graphdef, params),
                  os.path.join(run_dir, "checkpoints", str(step)), where)  # fmt: skip


def _abstract_state(run_config, method, model_config) -> TrainState:
    """Shapes of the run's `TrainState`, built as the runner builds it (same method,
    optimizer chain and parameters), for restoring its checkpoints into."""
    tx = optimizer.build(run_config.optimizer)
    theta0 = params_lib.split(method.ctx.family.abstract_model(model_config))[1]

    def fresh(theta0):
        params = method.init_params(theta0)
        return TrainState(np.zeros((), np.int32), params, tx.init(trained(params, method)),
                          method.init_state(params), np.zeros(2, np.uint32))  # fmt: skip

    return jax.eval_shape(fresh, theta0)


def _restore(directory: str, step: int, abstract: TrainState, mesh, rules):
    """(state, position) of checkpoint `step`, read without touching the directory: unlike the
    runner's manager, this one neither creates nor cleans up (a live run may be saving)."""
    if os.path.isdir(os.path.join(directory, str(step), "progress")):
        raise ValueError(
            f"{directory}/{step} was written by an older fomo_jax (items state + progress); "
            "evaluate it with fomo_jax at commit c9cca82 or earlier"
        )
    manager = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(create=False),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "position": ocp.JsonCheckpointHandler(),
            "record": ocp.JsonCheckpointHandler(),
        },
    )
    try:
        abstract = _as_saved(abstract, manager.item_metadata(step)["state"])
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract,
            shardings_of(abstract, mesh, rules),
        )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), position=ocp.args.JsonRestore()
            ),
        )
    finally:
        manager.close()
    return restored.state, restored.position


def _as_saved(abstract: TrainState, metadata) -> TrainState:
    """`abstract` with every leaf's shape and dtype as saved. A state built without the run's
    data cannot know shapes sized by it (ZSCL's reference texts: at most the pool's size);
    the structure, which the restore needs, is the runner's."""
    saved = {leaf.name: leaf for leaf in jax.tree_util.tree_leaves(metadata)}

    def adopt(path, leaf):
        found = saved.get(_dotted(path))
        if found is None:  # the restore names the mismatch
            return leaf
        return jax.ShapeDtypeStruct(tuple(found.shape), found.dtype)

    return jax.tree_util.tree_map_with_path(adopt, abstract)


def _dotted(path) -> str:
    """orbax's name of a leaf ("opt_state.1.mu.image.ln_pre.bias") from its jax key path."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:
            parts.append(str(getattr(key, "key", key)))
    return ".".join(parts)


def _check_vocabulary(tokenizer, model: CLIP, spec, path: str) -> None:
    """A tokenizer whose ids exceed the model's embedding table would index out of range
    (silently clamped under jit): refuse it with both sizes named."""
    if tokenizer.vocab_size > model.config.text.vocab_size:
        raise ValueError(
            f"config.tokenizer={spec!r} has {tokenizer.vocab_size} ids but {path} embeds "
            f"{model.config.text.vocab_size}; evaluate it with the tokenizer it was trained with"
        )
