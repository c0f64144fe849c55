"""The continual VLM stream on the synthetic world (`vlm_synth`): mixtures, batches, the run's
data, and θ0 made by a staged recipe.

**Mixtures** (spec §3.4): a `Mixture` is {source: weight} with a unit, `examples` (weights are
shares of examples) or `supervised_tokens` (weights are shares of supervised tokens, converted
to shares of examples by dividing by each source's mean supervised tokens per example, measured
on its first `MEASURE` examples). A zero weight drops the source. Position p of a mixture is
example p of the source a seeded draw picks for p (`Mixture.locate`), so a batch is a pure
function of positions and a resumed run reads exactly what an uninterrupted one does. Each
source has its own maximum length; an example longer than it is an error naming the source.

**Batches** (`Batches`, the loop's protocol: `dataset(start_step)`, `batch_size`, `sizes`): a
step's rows come from up to three pools (update, buffer, pretraining, `mixture.pool_batch_sizes`),
each a mixture read at consecutive positions, collated to the static shapes of the job
(`vlm_batches.collate`: the longest source's maximum length, the most images a source puts in a
row), with each row's `source` (its index in `vlm_synth.SOURCES`: the VLM family logs a loss
per source). `sizes` also holds per-source counts of the task (examples, tokens, supervised
tokens, images), which the runner keeps in `results.json`.

**The stream** (`StreamData`): task k trains on skill k of `config.data.skills` (its SFT
conversations and captioned pictures); the buffer mixes the earlier skills; the pretraining pool
(`config.data.pretraining_pool`) mixes VL sources with text-only ones.

**θ0** (`load_or_make_theta0`): the staged recipe (spec §5, correction 6): `lm` (the decoder
pretrained on the world's text), `clip` (a CLIP trained on the world's pairs with the CLIP
family: its image tower becomes the VLM's), `connector` (the connector alone on pairs), `vl` (VL
pretraining) and `sft`. Each stage is a job of the one loop with its own trainable rules and
mixture (an arm may set a stage's rules and method, e.g. the LM frozen, or LoRA on it, folded
in at the stage's end: `config.theta0.stages.<stage>.trainable` / `.method`), cached in
`<cache>/vlm_theta0/` under a key of everything that decides it (its recipe and every earlier
stage's), so every arm starts from identical backbones and a killed making resumes inside the
stage it was in. A stage of 0 steps passes its weights on unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil

import jax
import ml_collections
import numpy as np

from fomo_jax import distributed, families
from fomo_jax import params as params_lib
from fomo_jax.continual import loop as loop_lib
from fomo_jax.continual import methods
from fomo_jax.continual import workdir as workdir_lib
from fomo_jax.data import mixture as mixture_lib
from fomo_jax.data import vlm_batches as vb
from fomo_jax.data import vlm_synth
from fomo_jax.train import optimizer

UNITS = ("examples", "supervised_tokens")
MEASURE = 64  # examples per source measured for the token-unit conversion
# The most images a source puts in one row (documents: binding episodes of up to 5 pictures).
MAX_IMAGES = {"lm_text": 0, "lm_text_open": 0, "text_instr": 0, "documents": 5, "reordered": 5}


def example_stats(example: vb.Example, encode, seq: int) -> dict:
    """Tokens, supervised tokens and images of one example (as `collate` lays it out)."""
    ids, supervised, images = vb._tokens(example, encode, vlm_synth.SPECIALS, seq)
    return dict(examples=1, tokens=len(ids), supervised_tokens=int(sum(supervised)),
                images=len(images))  # fmt: skip


class Mixture:
    """{source: weight} of one pool; see the module docstring."""

    def __init__(self, world: vlm_synth.World, weights: dict, max_length: dict, *, unit: str,
                 key: str, encode, seq: int):  # fmt: skip
        if unit not in UNITS:
            raise ValueError(f"mixture unit {unit!r}; expected one of {UNITS}")
        for name, weight in weights.items():
            if name not in vlm_synth.SOURCES:
                raise ValueError(f"mixture {key!r}: unknown source {name!r}; the world's "
                                 f"sources are {vlm_synth.SOURCES}")  # fmt: skip
            if weight < 0:
                raise ValueError(f"mixture {key!r}: source {name!r} has weight {weight} < 0")
            if name not in max_length:
                raise ValueError(f"mixture {key!r}: no maximum length for source {name!r} "
                                 "(config.data.max_length)")  # fmt: skip
        self.names = tuple(n for n, w in weights.items() if w > 0)  # a zero weight drops it
        if not self.names:
            raise ValueError(f"mixture {key!r} has no source with a positive weight")
        self.world, self.key, self.unit, self.encode, self.seq = world, key, unit, encode, seq
        self.max_length = {n: int(max_length[n]) for n in self.names}
        share = np.array([float(weights[n]) for n in self.names])
        if unit == "supervised_tokens":
            share = share / np.array([self.mean_supervised(n) for n in self.names])
        self.probabilities = share / share.sum()

    def mean_supervised(self, name: str) -> float:
        stats = [example_stats(self.world.example(name, i), self.encode, self.seq)
                 for i in range(MEASURE)]  # fmt: skip
        return max(1.0, float(np.mean([s["supervised_tokens"] for s in stats])))

    @property
    def length(self) -> int:
        return max(self.max_length.values())

    @property
    def max_images(self) -> int:
        return max(MAX_IMAGES.get(n, 1) for n in self.names)

    def locate(self, position: int) -> tuple[str, int]:
        """(source, index) of the mixture's example at `position`."""
        u = np.random.default_rng([self.world.seed, mixture_lib.derive_seed(0, self.key),
                                   position]).random()  # fmt: skip
        k = min(int(np.searchsorted(np.cumsum(self.probabilities), u, side="right")),
                len(self.names) - 1)  # fmt: skip
        return self.names[k], position

    def __getitem__(self, position: int) -> vb.Example:
        name, index = self.locate(position)
        example = self.world.example(name, index)
        stats = example_stats(example, self.encode, self.seq)
        if stats["tokens"] > self.max_length[name]:
            raise ValueError(f"source {name!r} example {index} has {stats['tokens']} tokens, "
                             f"more than its maximum length {self.max_length[name]} "
                             "(config.data.max_length)")  # fmt: skip
        return example


@dataclasses.dataclass
class Pool:
    mixture: Mixture | None
    count: int  # rows per step
    offset: int = 0  # the position of the task's first row


class Batches:
    """The batches of one task (the loop's protocol); see the module docstring."""

    def __init__(self, pools: dict, steps: int, *, encode, seq: int, image_size: int,
                 rows=None):  # fmt: skip
        self.pools, self.steps, self.encode, self.seq = pools, steps, encode, seq
        self.image_size, self.rows = image_size, rows
        used = [p.mixture for p in pools.values() if p.count]
        self.length = max(m.length for m in used)
        self.max_images = max(m.max_images for m in used)
        self.batch_size = sum(p.count for p in pools.values())
        self._sizes = None

    def examples(self, step: int) -> list[vb.Example]:
        out = []
        for pool in self.pools.values():
            first = pool.offset + step * pool.count
            out += [pool.mixture[first + j] for j in range(pool.count)]
        return out

    def batch(self, step: int) -> dict:
        examples = self.examples(step)
        if self.rows is not None:
            examples = [examples[i] for i in self.rows]
        batch = vb.collate(examples, self.encode, vlm_synth.SPECIALS, self.seq, self.length,
                           self.max_images, self.image_size)  # fmt: skip
        source = np.array([vlm_synth.SOURCES.index(e.source) for e in examples], np.int32)
        return dict(batch, source=source, skipped=np.int32(0))

    def dataset(self, start_step: int):
        for step in range(start_step, self.steps):
            yield self.batch(step)

    @property
    def sizes(self) -> dict:
        """Rows per pool, and the task's examples, tokens, supervised tokens and images per
        source (a pure function of the task: the same after a resume)."""
        if self._sizes is None:
            sources: dict = {}
            for pool in self.pools.values():
                for step in range(self.steps):
                    for j in range(pool.count):
                        position = pool.offset + step * pool.count + j
                        name, index = pool.mixture.locate(position)
                        stats = example_stats(pool.mixture.world.example(name, index),
                                              self.encode, self.seq)  # fmt: skip
                        total = sources.setdefault(name, dict.fromkeys(stats, 0))
                        for k, v in stats.items():
                            total[k] += v
            self._sizes = {k: p.count for k, p in self.pools.items()}
            self._sizes["sources"] = dict(sorted(sources.items()))
        return self._sizes


def _lengths(config) -> dict:
    return {k: int(v) for k, v in config.data.max_length.items()}


@dataclasses.dataclass
class StreamData:
    """The run's data (`families.base.Data` and what the runner reads)."""

    root: str
    config: ml_collections.ConfigDict
    world: vlm_synth.World
    tokenizer: vlm_synth.WordTokenizer
    seq: int  # visual tokens per image
    image_size: int
    batch_keys: tuple
    rows: object = None
    datasets: dict = dataclasses.field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.config.data.skills)

    def mixture(self, weights: dict, key: str) -> Mixture:
        return Mixture(self.world, dict(weights), _lengths(self.config),
                       unit=self.config.data.unit, key=key, encode=self.tokenizer.encode,
                       seq=self.seq)  # fmt: skip

    def task_batches(self, task: int, batch_sizes: dict, steps: int, *,
                     pretraining_offset: int = 0) -> Batches:  # fmt: skip
        skills = self.tasks
        pools = {"update": Pool(self.mixture({skills[task]: 1.0}, f"update/{task}"),
                                batch_sizes["update"])}  # fmt: skip
        if batch_sizes["buffer"]:
            pools["buffer"] = Pool(self.mixture({s: 1.0 for s in skills[:task]}, f"buffer/{task}"),
                                   batch_sizes["buffer"])  # fmt: skip
        if batch_sizes["pretraining"]:
            pools["pretraining"] = Pool(
                self.mixture(self.config.data.pretraining_pool.to_dict(), "pretraining"),
                batch_sizes["pretraining"], offset=pretraining_offset)  # fmt: skip
        for name in ("buffer", "pretraining"):
            pools.setdefault(name, Pool(None, 0))
        return Batches(pools, steps, encode=self.tokenizer.encode, seq=self.seq,
                       image_size=self.image_size, rows=self.rows)  # fmt: skip

    def update_batches(self, task: int, batch_size: int, num_batches: int):
        batches = self.task_batches(task, {"update": batch_size, "buffer": 0, "pretraining": 0},
                                    num_batches)  # fmt: skip
        for step in range(num_batches):
            batch = batches.batch(step)
            yield {k: batch[k] for k in self.batch_keys}

    def pretraining_texts(self, count: int) -> list[str]:
        texts = []
        for i in range(count):
            texts += vlm_synth.training_texts(self.world.example("pairs", i))[:1]
        return texts


def prepare(config, family, model_config, tokenizer, rows=None) -> StreamData:
    """The stream's data of a `vlm_synth` config (the world is generated, not read: `data.root`
    holds θ0's caches and the world's description)."""
    d = config.data
    if len(d.skills) != config.num_tasks:
        raise ValueError(f"config.num_tasks={config.num_tasks} but config.data.skills has "
                         f"{len(d.skills)} skills (one task per skill)")  # fmt: skip
    for skill in d.skills:
        if skill not in vlm_synth.SKILLS:
            raise ValueError(f"config.data.skills: unknown skill {skill!r}; the world's skills "
                             f"are {vlm_synth.SKILLS}")  # fmt: skip
    world = vlm_synth.World(d.synth_seed)
    if distributed.primary():
        os.makedirs(d.root, exist_ok=True)
        workdir_lib.write_atomic(os.path.join(d.root, "world.json"), json.dumps(
            dict(seed=world.seed, looks=world.looks, facts=world.facts,
                 held_out=world.held_out_facts(), vocabulary=list(vlm_synth.VOCAB)),
            indent=1))  # fmt: skip
    return StreamData(d.root, config, world, tokenizer, model_config.image_seq_length,
                      model_config.vision.vision.image_size, family.batch_keys, rows)  # fmt: skip


# --------------------------------------------------------------------------------------- θ0

STAGES = ("lm", "clip", "connector", "vl", "sft")
TRAINABLE = {
    "lm": (("lm/.*", "full"),),
    "connector": (("connector/.*", "full"),),
    "vl": (("connector/.*", "full"), ("lm/.*", "full")),
    "sft": (("connector/.*", "full"), ("lm/.*", "full")),
}
CLIP_CONTEXT = 40  # bytes of a world caption (two objects) and the frame


def clip_config(model_config):
    """The world CLIP's architecture: the VLM's image tower and a byte-level text tower."""
    vision = model_config.vision
    text = dataclasses.replace(vision.text, context_length=CLIP_CONTEXT)
    return vision.replace(text=text)


def stage_key(config, model_config, stage: str) -> str:
    """The cache key of `stage`: the model, the world and the recipe of it and every earlier
    stage."""
    t = config.theta0
    upto = STAGES[: STAGES.index(stage) + 1]
    recipe = {s: _recipe(t.stages[s]) for s in upto}
    key = json.dumps(dict(model=repr(model_config), seed=config.seed,
                          world=(vlm_synth.VERSION, config.data.synth_seed),
                          batch_size=t.batch_size, weight_decay=t.weight_decay,
                          lengths=_lengths(config), unit=config.data.unit, recipe=recipe),
                     sort_keys=True)  # fmt: skip
    return hashlib.sha256(key.encode()).hexdigest()[:16]


STAGE_METHODS = ("finetune", "lora", "dora", "vera")  # what a stage may train with
# A stage's keys at these values are left out of its cache key (caches made before the keys
# existed stay valid).
STAGE_DEFAULTS = {"trainable": None, "method": "finetune", "method_options": {}}


def _recipe(stage: ml_collections.ConfigDict) -> dict:
    return {k: v for k, v in stage.to_dict().items()
            if k not in STAGE_DEFAULTS or v != STAGE_DEFAULTS[k]}  # fmt: skip


class _ClipBatches:
    """The world CLIP's batches: pairs' pictures and byte-tokenised captions."""

    def __init__(self, world, tokenizer, batch_size, steps, rows=None):
        self.world, self.tokenizer, self.steps, self.rows = world, tokenizer, steps, rows
        self.batch_size = batch_size
        self.sizes = {"update": batch_size, "buffer": 0, "pretraining": 0}

    def dataset(self, start_step: int):
        for step in range(start_step, self.steps):
            rows = range(step * self.batch_size, (step + 1) * self.batch_size)
            if self.rows is not None:
                rows = [rows[i] for i in self.rows]
            examples = [self.world.example("pairs", i) for i in rows]
            images = np.stack([e.segments[0].pixels for e in examples])
            token_ids = self.tokenizer([e.segments[1].text for e in examples])
            yield dict(images=images, token_ids=np.asarray(token_ids, np.int32),
                       skipped=np.int32(0))  # fmt: skip


def _stage_job(config, family, model_config, stage, workdir, mesh, tokenizer,
               batches) -> loop_lib.Job:  # fmt: skip
    from fomo_jax.continual import theta0 as theta0_lib

    t = config.theta0
    s = t.stages[stage]
    method = methods.get(s.get("method", "finetune"), s.get("method_options") or None)
    rules = s.get("trainable") or TRAINABLE.get(stage)
    method.setup(methods.Context(
        config=ml_collections.ConfigDict({"seed": config.seed, "trainable": rules}),
        family=family, model_config=model_config, tokenizer=tokenizer, data=methods.NoData(),
        workdir=workdir, steps_per_task=s.steps,
    ))  # fmt: skip
    schedule = theta0_lib.warmup_cosine(s.lr, s.steps)
    rates = [float(schedule(step)) for step in range(s.steps)]
    return loop_lib.Job(
        workdir=workdir, family=family, method=method,
        tx=optimizer.build(theta0_lib.adamw_config(t.weight_decay)), mesh=mesh, steps=s.steps,
        num_tasks=1, lr_of=lambda task, step: rates[step], batches=lambda task, record: batches,
        seed=mixture_lib.derive_seed(config.seed, "theta0", stage),
        log_every=max(1, s.steps // 5), checkpoint_every=config.checkpoint_every,
        name=f"θ0 {stage}",
    )  # fmt: skip


def _train_stage(config, data, model_config, stage, start_params, workdir, mesh) -> dict:
    s = config.theta0.stages[stage]
    if s.steps == 0:  # a skipped stage (an arm's control, e.g. SFT without VL pretraining)
        return start_params
    batch_size = config.theta0.batch_size
    if stage == "clip":
        from fomo_jax.tokenizer import ByteTokenizer

        family = families.get("clip")
        cfg = clip_config(model_config)
        tokenizer = ByteTokenizer(context_length=CLIP_CONTEXT)
        batches = _ClipBatches(data.world, tokenizer, batch_size, s.steps, data.rows)
    else:
        family = families.get(config.family).configured(config)
        cfg, tokenizer = model_config, data.tokenizer
        mixture = data.mixture(s.sources.to_dict(), f"theta0/{stage}")
        batches = Batches({"update": Pool(mixture, batch_size)}, s.steps,
                          encode=tokenizer.encode, seq=data.seq, image_size=data.image_size,
                          rows=data.rows)  # fmt: skip
    job = _stage_job(config, family, cfg, stage, workdir, mesh, tokenizer, batches)
    state, _ = loop_lib.train(job, job.method.init_params(start_params))
    # The plain model's weights (a stage's adapters folded in)
    return job.method.export_params(distributed.to_host(state.params))[1]


def load_or_make_theta0(config, family, model_config, data: StreamData, cache_dir: str,
                        mesh, *, until: str = "sft") -> dict:  # fmt: skip
    """θ0 of a `vlm_synth` run: the staged recipe's last stage, each stage cached. A cache is
    read only when a later stage starts from it, or when it is θ0. `config.theta0.checkpoint`
    (a LLaVA directory) replaces the recipe. `until`: the weights after that stage instead
    (the stages after it are not made; `benchmarks/vlm_findings.py` evaluates VL pretraining's
    arms at `vl`)."""
    if config.theta0.checkpoint:
        return family.load_params(config.theta0.checkpoint, model_config)
    for stage in STAGES:  # before any stage is made
        steps = config.theta0.stages[stage].steps
        if steps < 0:
            raise ValueError(f"config.theta0.stages.{stage}.steps={steps}: 0 (skip it) or more")
        name = config.theta0.stages[stage].get("method", "finetune")
        if name not in STAGE_METHODS:
            raise ValueError(f"config.theta0.stages.{stage}.method={name!r}: a stage trains "
                             f"with one of {list(STAGE_METHODS)}")  # fmt: skip
    if until not in STAGES or until == "clip":
        raise ValueError(
            f"until={until!r}: a VLM stage, one of {[s for s in STAGES if s != 'clip']}"
        )
    directory = os.path.join(cache_dir, "vlm_theta0")
    params, latest = None, None  # weights in memory; the latest cache not read into them
    for stage in STAGES[: STAGES.index(until) + 1]:
        path = os.path.join(directory, f"{stage}-{stage_key(config, model_config, stage)}.npz")
        workdir = path.removesuffix(".npz") + ".work"
        distributed.barrier(f"θ0 stage {stage} looked up")
        made = False
        if not os.path.exists(path):
            if latest is not None:  # the previous stage, from its cache
                params = _read(latest)
            elif params is None:  # the first stage starts from a fresh VLM
                params = jax.device_get(params_lib.split(
                    family.init_model(model_config, config.seed))[1])  # fmt: skip
            lock = (
                workdir_lib.locked(workdir) if distributed.primary() else contextlib.nullcontext()
            )
            with lock:
                if not os.path.exists(path):  # else made while this process waited for the lock
                    logging.info("making θ0 stage %s in %s", stage, workdir)
                    params = _make_stage(config, data, model_config, stage, params, workdir,
                                         mesh, path)  # fmt: skip
                    made = True
            distributed.barrier(f"θ0 stage {stage} written")
        latest = None if made else path
    logging.info("θ0 from the staged recipe's cache in %s", directory)
    return params if latest is None else _read(latest)


def _read(path: str) -> dict:
    with np.load(path) as f:
        return params_lib.unflatten({k: f[k] for k in f.files})


def _make_stage(config, data, model_config, stage, params, workdir, mesh, path) -> dict:
    if stage == "clip":  # a CLIP of the VLM's image tower; its image tower replaces the VLM's
        clip_family = families.get("clip")
        seed = mixture_lib.derive_seed(config.seed, "clip") % 2**31
        clip = params_lib.split(clip_family.init_model(clip_config(model_config), seed))[1]
        trained = _train_stage(config, data, model_config, stage, jax.device_get(clip), workdir,
                               mesh)  # fmt: skip
        params = dict(params, image={k: v for k, v in trained["image"].items() if k != "proj"})
    else:
        params = _train_stage(config, data, model_config, stage, params, workdir, mesh)
    if distributed.primary():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **params_lib.flatten(jax.device_get(params)))
        os.replace(tmp, path)  # atomic: a killed run never leaves half a cache
        shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
    return params
