"""grain input pipelines: the mixed training batch of a task, and evaluation batches.

The training pipeline of task k is a `grain.MapDataset` over element positions
j = step * B + slot. Slot ranges pick the pool (update, then buffer, then pretraining, spec
§4.2), the pool's sampler picks the sample, and a seeded `random_map` decodes, crops and picks
a caption. Everything is a pure function of (seed, task, position), so a pipeline rebuilt at
any step yields exactly the batches an uninterrupted one would: the task and the step are all
a checkpoint needs to store (the grain iterator state of `dataset()` works as well).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping

import grain
import numpy as np
from PIL import Image

from fomo_jax.data import fif, mixture, transforms

POOL_IDS = {name: i for i, name in enumerate(mixture.BATCH_ORDER)}
MAX_REPLACEMENTS = 16  # undecodable draws in a row for one sample before the run stops


def example_texts(example: Mapping) -> list[str]:
    """Candidate texts of a source example: `captions` (FiF, records) or `text` (WebDataset)."""
    if "captions" in example:
        return list(example["captions"])
    return [example["text"]]


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """Decode + RandomResizedCrop + caption choice for one element (spec §2.5-2.6)."""

    image_size: int
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, example: Mapping, rng: np.random.Generator) -> dict:
        image = example["image"]
        if not isinstance(image, Image.Image):  # else decoded already (DecodedSource)
            image = transforms.decode_rgb(image, name=example_name(example))
        pixels = transforms.train_transform(image, rng, self.image_size, self.scale, self.ratio)
        return {"image": pixels, "text": fif.choose_caption(example_texts(example), rng)}


def example_name(example: Mapping) -> str:
    return f"{example.get('dataset', '?')}:{example.get('key', '?')}"


class TaskBatches:
    """The mixed batches of one task: `steps` batches of `sum(batch_sizes)` examples.

    Args:
      catalogue: the training splits of the stream's datasets (global sample ids).
      update_ids, buffer_ids: global ids of the task's update and buffer pools.
      pretraining: a random-access source of the replay pool (or None when its share is 0).
      batch_sizes: per-pool batch sizes (`mixture.pool_batch_sizes`).
      steps: steps of this task.
      seed, task: the experiment seed and the task index; every random stream derives from them.
      pretraining_offset: position of the (continuing) pretraining stream at the task start.
      tokenizer: texts -> int32 [B, L].
      image_size: side of the training crops.
      num_threads: decode threads (0 = in the calling thread; default one per core, up to 8:
        more threads than cores only add GIL contention, benchmarks/data_throughput.py).
      whole_batches: each batch is built whole by one thread (grain's per-item machinery runs
        once per batch), `prefetch` batches ahead; for cheap samples (images decoded already,
        `DecodedSource`), where that machinery is a sizeable part of the cost. Otherwise the
        threads share the samples of each batch (JPEG decoding). Either way, the same batches.
      bad_images: what an undecodable image does. "error": stop, naming the file and the split;
        "skip": replace the sample by a draw from the same pool that is a pure function of
        (seed, task, position, attempt), so a resumed run draws the same replacement; each
        batch's `skipped` counts the replaced samples.
      rows: the rows of every global batch to load (a process of a multi-host run loads only
        its devices' share, `distributed.local_rows`); default all. Every example is the same
        pure function of its global position either way.
    """

    def __init__(
        self,
        *,
        catalogue: mixture.Catalogue,
        update_ids: np.ndarray,
        buffer_ids: np.ndarray,
        pretraining,
        batch_sizes: Mapping[str, int],
        steps: int,
        seed: int,
        task: int,
        pretraining_offset: int = 0,
        tokenizer: Callable,
        image_size: int,
        num_threads: int | None = None,
        prefetch: int = 2,
        bad_images: str = "error",
        rows: np.ndarray | None = None,
        whole_batches: bool = False,
    ):
        if bad_images not in ("error", "skip"):
            raise ValueError(f"bad_images={bad_images!r}; expected 'error' or 'skip'")
        self.bad_images = bad_images
        self.sizes = {k: int(batch_sizes[k]) for k in mixture.BATCH_ORDER}
        self.batch_size = sum(self.sizes.values())  # of the global batch
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        self.steps = steps
        self.seed, self.task = seed, task
        if self.sizes["pretraining"] and pretraining is None:
            raise ValueError("the mixture gives the pretraining pool a share but no pool is set")
        for name, ids in (("update", update_ids), ("buffer", buffer_ids)):
            if self.sizes[name] and not len(ids):
                raise ValueError(f"task {task}: the {name} pool is empty but has a batch share")
        self.samplers = {
            "update": mixture.PoolSampler(update_ids, mixture.derive_seed(seed, task, "update")),
            "buffer": mixture.PoolSampler(buffer_ids, mixture.derive_seed(seed, task, "buffer")),
        }
        if pretraining is not None:
            # One stream across tasks: its permutations do not depend on the task.
            self.samplers["pretraining"] = mixture.PoolSampler(
                np.arange(len(pretraining)), mixture.derive_seed(seed, "pretraining")
            )
        self.catalogue, self.pretraining = catalogue, pretraining
        self.pretraining_offset = pretraining_offset
        self.tokenizer = tokenizer
        self.transform = TrainTransform(image_size)
        if num_threads is None:
            num_threads = min(8, os.cpu_count() or 1)
        self.whole_batches = whole_batches
        self.read_options = grain.ReadOptions(
            num_threads=num_threads,
            prefetch_buffer_size=max(1, prefetch * (1 if whole_batches else self.batch_size)),
        )
        self._bounds = np.cumsum([self.sizes[k] for k in mixture.BATCH_ORDER])

    def locate(self, position: int) -> tuple[str, int]:
        """Element position -> (pool name, sample id in the pool's source)."""
        step, slot = divmod(position, self.batch_size)
        p = int(np.searchsorted(self._bounds, slot, side="right"))
        pool = mixture.BATCH_ORDER[p]
        first = 0 if p == 0 else int(self._bounds[p - 1])
        pool_position = step * self.sizes[pool] + slot - first
        if pool == "pretraining":
            pool_position += self.pretraining_offset
        return pool, self.samplers[pool][pool_position]

    def _load(self, position: int) -> dict:
        pool, sample = self.locate(position)
        return self._example(pool, sample, position)

    def _example(self, pool: str, sample: int, position: int) -> dict:
        source = self.pretraining if pool == "pretraining" else self.catalogue
        return dict(source[sample], pool=POOL_IDS[pool], position=position)

    def _augment(self, example: dict, rng: np.random.Generator) -> dict:
        # A failed decode draws nothing from `rng`, so the replacement's crop and caption are
        # what the original's would have been: a pure function of the position still.
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                out = self.transform(example, rng)
                break
            except transforms.UndecodableImage as error:
                pool = mixture.BATCH_ORDER[example["pool"]]
                where = (f"the {example.get('dataset', '?')} train split" if pool != "pretraining"
                         else "the pretraining pool")  # fmt: skip
                if self.bad_images == "error":
                    raise ValueError(
                        f"task {self.task}, {pool} pool, {where}: {error} (set "
                        "config.data.bad_images='skip' to replace undecodable images)"
                    ) from error
                if attempt == MAX_REPLACEMENTS:
                    raise ValueError(
                        f"task {self.task}, {pool} pool: {MAX_REPLACEMENTS + 1} undecodable "
                        f"images in a row at position {example['position']}; last: {error}"
                    ) from error
                logging.warning("skipping an undecodable image of %s: %s", where, error)
                example = self._replacement(pool, example["position"], attempt)
        out["pool"] = example["pool"]
        out["skipped"] = attempt
        return out

    def _replacement(self, pool: str, position: int, attempt: int) -> dict:
        ids = self.samplers[pool].ids
        rng = np.random.default_rng(
            mixture.derive_seed(self.seed, self.task, "bad_image", position, attempt)
        )
        return self._example(pool, int(ids[rng.integers(len(ids))]), position)

    def _collate(self, examples: list[dict]) -> dict:
        return {
            "images": np.stack([e["image"] for e in examples]),
            "token_ids": self.tokenizer([e["text"] for e in examples]),
            "pool": np.array([e["pool"] for e in examples], np.int8),
            "skipped": np.int64(sum(e["skipped"] for e in examples)),
        }

    def elements(self) -> grain.MapDataset:
        """Random-access augmented examples; index j is slot j % B of step j // B (with
        `rows`: slot rows[j % n] of step j // n, seeded as that global position)."""
        # One random_map (loading draws nothing): element j's generator is seeded by j alone.
        every = grain.MapDataset.range(self.steps * self.batch_size).random_map(
            lambda j, rng: self._augment(self._load(j), rng),
            seed=mixture.derive_seed(self.seed, self.task, "augment"),
        )
        if self.rows is None:
            return every
        n, rows = len(self.rows), self.rows
        return grain.MapDataset.range(self.steps * n).map(
            lambda j: every[(j // n) * self.batch_size + int(rows[j % n])]
        )

    @property
    def local_batch_size(self) -> int:
        """Rows per batch this pipeline yields (the global batch size unless `rows`)."""
        return self.batch_size if self.rows is None else len(self.rows)

    def dataset(self, start_step: int = 0) -> grain.IterDataset:
        """Batches from `start_step` on. Slicing keeps each element's index, hence its
        random seed, so a pipeline started at step s continues an uninterrupted one exactly."""
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps}")
        n = self.local_batch_size
        elements = self.elements()[start_step * n :]
        if self.whole_batches:
            batches = elements.batch(n, drop_remainder=True, batch_fn=self._collate)
            return batches.to_iter_dataset(self.read_options)
        return elements.to_iter_dataset(self.read_options).batch(
            n, drop_remainder=True, batch_fn=self._collate
        )


def pool_batches(
    pool,
    *,
    batch_size,
    steps,
    seed,
    tokenizer,
    image_size,
    num_threads=None,
    bad_images="error",
    rows=None,
    whole_batches=False,
):
    """Batches from the pretraining pool alone (making θ0): a task with only that pool."""
    return TaskBatches(
        catalogue=mixture.Catalogue({}),
        update_ids=np.zeros(0, np.int64),
        buffer_ids=np.zeros(0, np.int64),
        pretraining=pool,
        batch_sizes={"pretraining": batch_size, "update": 0, "buffer": 0},
        steps=steps,
        seed=seed,
        task=0,
        tokenizer=tokenizer,
        image_size=image_size,
        num_threads=num_threads,
        bad_images=bad_images,
        rows=rows,
        whole_batches=whole_batches,
    )


class EvalImages:
    """Test-transformed images of a split in fixed-size batches (the last one padded).

    Yields {"images": uint8 [B, S, S, 3], "target": int64 [B], "valid": bool [B]}; padding rows
    are zeros with valid False, so an evaluation step compiles once per batch size.
    """

    def __init__(self, source, image_size: int, batch_size: int, *, num_threads: int | None = None):
        self.source, self.image_size, self.batch_size = source, image_size, batch_size
        if num_threads is None:
            num_threads = min(8, os.cpu_count() or 1)
        self.read_options = grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=max(1, 2 * batch_size)
        )

    def _load(self, index: int) -> dict:
        example = self.source[index]
        try:
            image = transforms.decode_rgb(example["image"], name=example_name(example))
        except transforms.UndecodableImage as error:  # a test set is evaluated whole
            raise ValueError(
                f"the {example.get('dataset', '?')} evaluation split: {error} (data.bad_images "
                "applies to training data; a test set is scored on every image)"
            ) from error
        return {
            "image": transforms.test_transform(image, self.image_size),
            "target": int(example.get("target", 0)),
        }

    def _collate(self, examples: list[dict]) -> dict:
        pad = self.batch_size - len(examples)
        images = np.stack([e["image"] for e in examples])
        return {
            "images": np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)]),
            "target": np.array([e["target"] for e in examples] + [0] * pad, np.int64),
            "valid": np.arange(self.batch_size) < len(examples),
        }

    def __iter__(self):
        dataset = grain.MapDataset.range(len(self.source)).map(self._load)
        batches = dataset.to_iter_dataset(self.read_options).batch(
            self.batch_size, drop_remainder=False, batch_fn=self._collate
        )
        return iter(batches)


class DecodedSource:
    """A random-access source with every image decoded once, up front, and held in memory
    (`config.data.decode_once`): for small images (fif_synth's 40-px pictures, 4.8 KB each
    decoded), where per-sample JPEG reading and decoding cost more than the training step's
    compute. Batches are bit-identical to the wrapped source's: decoding is deterministic and
    draws no random numbers. Examples keep every other field; an image that does not decode
    stays encoded, so drawing it fails (or is skipped) as before. Attributes other than items
    (`targets`, `manifest`, ...) are the wrapped source's.
    """

    def __init__(self, source):
        self.source = source
        start = time.perf_counter()

        def load(index: int):
            example = dict(source[index])
            try:
                example["image"] = transforms.decode_rgb(example["image"],
                                                         name=example_name(example))  # fmt: skip
            except transforms.UndecodableImage:
                pass
            return example

        workers = min(8, os.cpu_count() or 1)  # PIL's decoder releases the GIL
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            self.examples = list(pool.map(load, range(len(source))))
        pixels = sum(e["image"].width * e["image"].height for e in self.examples
                     if isinstance(e["image"], Image.Image))  # fmt: skip
        logging.info("decoded %d images of %r into memory (%.0f MiB) in %.1fs",
                     len(self.examples), source, 3 * pixels / 2**20,
                     time.perf_counter() - start)  # fmt: skip

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return dict(self.examples[index])

    def __getattr__(self, name):
        if name == "source":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def __repr__(self) -> str:
        return f"DecodedSource({self.source!r})"


class SplitSource:
    """A `fif.Split` as a random-access source of {"image": path or encoded bytes, "captions",
    "target", ...}."""

    def __init__(self, split: fif.Split):
        self.split = split
        self.dataset = split.dataset
        self.targets = split.targets

    def __len__(self) -> int:
        return len(self.split)

    def __repr__(self) -> str:
        return f"SplitSource({self.split.dataset} {self.split.split})"

    def __getitem__(self, index: int) -> dict:
        r = self.split[index]
        return {
            "image": r.image,
            "captions": r.captions,
            "target": r.target,
            "classname": r.classname,
            "dataset": r.dataset,
            "key": r.key,
        }
