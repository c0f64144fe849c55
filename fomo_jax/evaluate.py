"""Zero-shot evaluation of a CLIP on FiF-layout test splits (spec §10).

Classification: one prompt per class (the dataset's template), argmax over the dataset's own
label space, compared with the absolute class index (spec §10.2 [FIX]). Retrieval: every caption
of every image; R@k is the mean of text->image and image->text recall, where an image is a hit
for image->text if any of its captions is among the k nearest. Ties follow a stable descending
sort: among equally similar candidates the one with the lower index ranks first.

`Evaluator` is what a continual run uses: it decodes the test images once, fixes the "10%"
evaluation subset of every dataset (spec §10.4), embeds all datasets in one pass of fixed-size
batches and reuses the embeddings of a tower whose weights did not change (spec §12 item 19).
`evaluate_datasets` / `summarize` give the same numbers as flat {dataset: score} dicts.

Decoded test images can live on disk instead of in host memory (`cache_dir`: the 63 real test
sets are ~100 GiB at 224 px): each set becomes one `.npy` file, decoded once (each process of a
multi-process run decodes its share of the rows) and read back a batch at a time
(`DiskImages`), so a host holds one batch of images, not the test sets. With a `mesh`, every
batch of `batch_size` rows is split over the mesh's batch axes: each process reads and feeds
only its rows, the towers run on the run's sharded weights, and the embeddings come back to
every process (they are small), which all compute the same scores.

Progress goes to the log at INFO: one line per test set as it is decoded (big sets also as
they go), and for every group of rows embedded (test images, class prompts, captions) a line
at about every tenth of the rows, naming the dataset reached, and a closing line with the
time taken. Lines are at least `PROGRESS_MIN_ROWS` rows apart, so small passes stay quiet.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from fomo_jax import distributed, sharding
from fomo_jax import params as params_lib
from fomo_jax.data import fif, pipeline, registry
from fomo_jax.models.clip import batch_pixels, text_width


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ------------------------------------------------------------------------------ metrics


def _own_ranks(sim: np.ndarray, own: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Position of column `own[i]` in row `rows[i]` of `sim` under a stable descending sort.

    Counting (greater) + (equal with a lower index) gives exactly the stable-sort position
    without sorting, in O(rows x columns) and bounded memory. NaN similarities count as -inf.
    """
    rows = np.arange(len(own)) if rows is None else rows
    ranks = np.empty(len(own), np.int64)
    columns = np.arange(sim.shape[1])
    chunk = max(1, (1 << 22) // max(1, sim.shape[1]))
    for start in range(0, len(own), chunk):
        r, o = rows[start : start + chunk], own[start : start + chunk]
        block = np.nan_to_num(sim[r], nan=-np.inf)
        value = block[np.arange(len(r)), o][:, None]
        ranks[start : start + chunk] = np.count_nonzero(block > value, axis=1)
        equal = block == value
        if np.count_nonzero(equal) > len(r):  # ties besides the entry itself
            ranks[start : start + chunk] += np.count_nonzero(
                equal & (columns[None, :] < o[:, None]), axis=1
            )
    return ranks


def classification_score(image_emb, class_emb, targets) -> float:
    """Top-1 accuracy in percent; `targets` are absolute indices into `class_emb`'s rows."""
    sim = np.nan_to_num(np.asarray(image_emb) @ np.asarray(class_emb).T, nan=-np.inf)
    return 100.0 * float(np.mean(np.argmax(sim, axis=1) == np.asarray(targets)))


def retrieval_scores(image_emb, text_emb, owner, ks: Sequence[int] = (1, 5)) -> dict:
    """{"t2i@k", "i2t@k", "recall@k"} in percent for each k; recall@k is the mean of the two.

    `owner[j]` is the image of caption j. Text->image: caption j is a hit when its image is
    among the k most similar images. Image->text: image i is a hit when any of its captions is
    among the k most similar captions (an image without captions never is).
    """
    owner = np.asarray(owner, np.int64)
    sim = np.asarray(image_emb) @ np.asarray(text_emb).T  # [images, captions]
    t2i_rank = _own_ranks(np.ascontiguousarray(sim.T), owner)  # row gathers need C order
    # An image's I2T rank is the rank of its best caption: the most similar one, the lowest
    # index among equals (rank is monotone in both), so one rank per image suffices.
    captions = np.arange(len(owner))
    own_sim = np.nan_to_num(sim[owner, captions], nan=-np.inf)
    best_sim = np.full(sim.shape[0], -np.inf)
    np.maximum.at(best_sim, owner, own_sim)
    best = np.full(sim.shape[0], len(owner))
    top = own_sim == best_sim[owner]
    np.minimum.at(best, owner[top], captions[top])
    has_caption = best < len(owner)
    i2t_rank = np.full(sim.shape[0], np.iinfo(np.int64).max)
    i2t_rank[has_caption] = _own_ranks(sim, best[has_caption], np.flatnonzero(has_caption))
    scores = {}
    for k in ks:
        t2i, i2t = float(np.mean(t2i_rank < k)), float(np.mean(i2t_rank < k))
        scores.update({f"t2i@{k}": 100.0 * t2i, f"i2t@{k}": 100.0 * i2t})
        scores[f"recall@{k}"] = 50.0 * (t2i + i2t)
    return scores


# ----------------------------------------------------------------- one-shot evaluation


def evaluate_datasets(model, root, datasets, tokenizer, image_size, info_dir=None) -> dict:
    """{dataset key: accuracy or R@5} on the full test split of every dataset (one shot; a
    run that evaluates repeatedly keeps one `Evaluator`)."""
    evaluator = Evaluator(root, datasets, tokenizer, image_size, info_dir=info_dir)
    return {k: headline(v) for k, v in evaluator.evaluate(model, subset=False).items()}


def summarize(scores: dict, datasets: dict) -> dict:
    """A_KA, A_ZS and GM (short names) of {dataset: accuracy or R@5} (spec §10.5)."""
    metrics = headline_metrics({k: {"accuracy": v} for k, v in scores.items()}, datasets)
    return dict(
        A_KA=metrics["knowledge_accumulation"],
        A_ZS=metrics["zero_shot_retention"],
        GM=metrics["geometric_mean"],
    )


def chance_levels(datasets: dict, root: str) -> dict:
    """Accuracy of guessing (percent); retrieval chance is k / number of images."""
    info_dir = fif.default_info_dir(root)
    levels = {}
    for key, info in datasets.items():
        if info.is_retrieval:
            levels[key] = 100.0 * 5 / info.num_test
        else:
            levels[key] = 100.0 / len(registry.classnames(info, os.path.join(info_dir)))
    return levels


# --------------------------------------------------------------- subsets and summaries


def subset_indices(targets, seed: int) -> np.ndarray:
    """The fixed evaluation subset of a test set (spec §10.4), sorted int64 indices.

    n = min(N, max(2C, 300, floor(N / 10))) with C distinct targets; floor(n / C) samples of
    every class (all of a smaller class), in sorted class order, then the rest uniformly from
    the samples not yet drawn. A fresh `default_rng(seed)` per call makes the subset a pure
    function of (targets, seed): identical at every evaluation of a run.
    """
    targets = np.asarray(targets).reshape(-1)
    total = len(targets)
    if total == 0:
        return np.zeros(0, np.int64)
    classes = np.unique(targets)
    order = np.argsort(targets, kind="stable")  # members of a class in index order
    starts = np.searchsorted(targets[order], classes)
    ends = np.append(starts[1:], total)
    n = min(total, max(2 * len(classes), 300, total // 10))
    per_class = n // len(classes)
    rng = np.random.default_rng(seed)
    taken = np.zeros(total, bool)
    for start, end in zip(starts, ends, strict=True):
        members = order[start:end]
        taken[rng.choice(members, min(per_class, len(members)), replace=False)] = True
    rest = np.flatnonzero(~taken)
    taken[rng.choice(rest, n - int(taken.sum()), replace=False)] = True
    return np.flatnonzero(taken).astype(np.int64)


def caption_subset(owner, images) -> tuple[np.ndarray, np.ndarray]:
    """(caption indices, their re-indexed owners) of the sorted image subset `images`.

    Keeps exactly the captions of the sampled images, in their original order, with owners
    renumbered to positions in `images`: the spec §10.4 [FIX] for retrieval subsets.
    """
    owner, images = np.asarray(owner, np.int64), np.asarray(images, np.int64)
    keep = np.flatnonzero(np.isin(owner, images))
    return keep, np.searchsorted(images, owner[keep]).astype(np.int64)


def headline(entry: dict) -> float:
    """The value a dataset contributes to A_KA / A_ZS: accuracy, or R@5 for retrieval."""
    return entry["accuracy"] if "accuracy" in entry else entry["recall@5"]


def headline_metrics(results: dict, datasets: dict) -> dict:
    """knowledge_accumulation (A_KA), zero_shot_retention (A_ZS), geometric_mean (GM), percent.

    Unweighted means of `headline` over the adaptation and the evaluation-only datasets in
    `results` (NaN for an empty group); GM = sqrt(A_KA * A_ZS) (spec §10.5).
    """

    def mean(role):
        values = [headline(v) for k, v in results.items() if datasets[k].role == role]
        return float(np.mean(values)) if values else float("nan")

    a_ka, a_zs = mean("adaptation"), mean("evaluation")
    return dict(
        knowledge_accumulation=a_ka,
        zero_shot_retention=a_zs,
        geometric_mean=float(np.sqrt(a_ka * a_zs)),
    )


def area_under_trajectory(values: Sequence[float]) -> float:
    """Trapezoid area under equally spaced evaluation points, divided by the intervals.

    Normalizing by the number of intervals (len - 1) keeps the unit of the values (percent):
    a constant trajectory gives that constant and the result is comparable across streams
    with different numbers of evaluations. A single point is its own value.
    """
    v = np.asarray(values, np.float64).reshape(-1)
    if len(v) == 0:
        raise ValueError("area_under_trajectory needs at least one value")
    if len(v) == 1:
        return float(v[0])
    return float(np.mean((v[1:] + v[:-1]) / 2))


# ---------------------------------------------------------------------------- Evaluator


@dataclasses.dataclass
class EvalSet:
    """One dataset's evaluation data, prepared once per run.

    images: uint8 [N, S, S, 3] after the test transform. tokens: the class prompts
    (classification, row c = class c) or every caption (retrieval, an image's captions
    contiguous). targets: class per image (classification). owner: image of each caption
    (retrieval). subset: the fixed image subset; subset_captions / subset_owner: the captions
    of the subset images and their owners re-indexed into the subset.
    """

    key: str
    role: str
    retrieval: bool
    images: np.ndarray
    tokens: np.ndarray
    targets: np.ndarray
    owner: np.ndarray | None = None
    subset: np.ndarray | None = None
    subset_captions: np.ndarray | None = None
    subset_owner: np.ndarray | None = None

    def fix_subset(self, targets_for_subset, seed: int) -> None:
        self.subset = subset_indices(targets_for_subset, seed)
        if self.retrieval:
            self.subset_captions, self.subset_owner = caption_subset(self.owner, self.subset)


PROGRESS_MIN_ROWS = 10_000  # rows between two progress lines of one pass, at least


class Progress:
    """Progress of a long pass over `total` rows, logged at INFO without flooding the log.

    Call it with the rows done so far: it logs when they cross the next tenth of `total` (but
    at least `PROGRESS_MIN_ROWS` rows after the last line, so small passes stay quiet) and,
    with `closing`, once when all are done, with the seconds since it was made. `where(done)`
    may name the place reached (e.g. the dataset).
    """

    def __init__(self, what: str, total: int, *, where=None, closing=True):
        self.what, self.total, self.where, self.closing = what, total, where, closing
        self.every = max(PROGRESS_MIN_ROWS, -(-total // 10))
        self.next = self.every
        self.start = time.perf_counter()

    def __call__(self, done: int) -> None:
        seconds = time.perf_counter() - self.start
        if done >= self.total:
            if self.closing:
                logging.info("%s: %d rows in %.1fs", self.what, self.total, seconds)
                self.closing = False  # once
        elif done >= self.next:
            where = f", {self.where(done)}" if self.where else ""
            logging.info("%s: %d/%d rows (%.0f%%)%s, %.1fs", self.what, done, self.total,
                         100 * done / self.total, where, seconds)  # fmt: skip
            self.next = (done // self.every + 1) * self.every


def decode_images(split, image_size: int, batch_size: int = 256, progress=None):
    """All test-transformed images of a split as one uint8 [N, S, S, 3] array.

    `progress(images decoded so far)` is called after every batch (see `Progress`)."""
    out = np.empty((len(split), image_size, image_size, 3), np.uint8)
    position = 0
    for valid in _decoded_batches(pipeline.SplitSource(split), image_size, batch_size):
        out[position : position + len(valid)] = valid
        position += len(valid)
        if progress is not None:
            progress(position)
    return out


def _decoded_batches(source, image_size: int, batch_size: int):
    for batch in pipeline.EvalImages(source, image_size, batch_size):
        yield batch["images"][batch["valid"]]


class _Rows:
    """Rows [start, stop) of a random-access source."""

    def __init__(self, source, start: int, stop: int):
        self.source, self.start, self.stop = source, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        return self.source[self.start + index]


class DiskImages:
    """Decoded images in a `.npy` file, read from it on every indexing (no mapping is kept):
    indexing with row indices (or a slice) returns those rows as a new array, one read per run
    of consecutive rows, so host memory holds what a batch needs and the kernel's page cache,
    which it may drop, holds the rest."""

    def __init__(self, path: str):
        header = np.load(path, mmap_mode="r")
        self.path, self.shape, self.dtype = path, header.shape, header.dtype
        self.offset = header.offset
        self.row_bytes = int(np.prod(self.shape[1:])) * header.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, np.int64)
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"rows {rows.min()}..{rows.max()} of {self.path} ({len(self)} rows)")
        flat = out.reshape(len(rows), -1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # runs of consecutive rows: one read
        with open(self.path, "rb", buffering=0) as f:
            for first, last in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
                size = (last - first) * self.row_bytes
                f.seek(self.offset + int(rows[first]) * self.row_bytes)
                got = f.readinto(memoryview(flat[first:last].reshape(-1)))
                if got != size:
                    raise OSError(f"{self.path}: read {got} of {size} bytes at row {rows[first]}")
        return out


def cached_images(split, key: str, image_size: int, cache_dir: str, batch_size: int = 256):
    """The test-transformed images of `split` as `DiskImages` in `cache_dir`, decoded on the
    first call and reused after (a resumed run, or other runs sharing the folder).

    The file's name carries a digest of what it holds (dataset, image size, number of
    images, the split's info JSON and its modification time), and a `.done` file marks it
    complete. Several processes: process 0 decides and holds the folder's lock for that file;
    each process decodes and writes its contiguous share of the rows; all wait for the mark.
    """
    identity = dict(dataset=key, images=len(split), image_size=image_size,
                    info=os.path.abspath(split.info_path) if split.info_path else None,
                    records=split.records_dir)  # fmt: skip
    if split.info_path and os.path.exists(split.info_path):
        identity["info_mtime_ns"] = os.stat(split.info_path).st_mtime_ns
    digest = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=6)
    path = os.path.join(cache_dir, f"{key}_{image_size}px_{digest.hexdigest()}.npy")
    done = path + ".done"
    lock = contextlib.nullcontext()
    if distributed.primary():
        os.makedirs(cache_dir, exist_ok=True)
        lock = _file_lock(path + ".lock")
    with lock:
        if distributed.broadcast_from_primary(os.path.exists(done)):
            logging.info("test set %s: decoded images read from %s", key, path)
            return DiskImages(path)
        shape = (len(split), image_size, image_size, 3)
        if distributed.primary():  # the file at its full size (sparse until written)
            np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
        distributed.barrier(f"{path} created")
        images = DiskImages(path)
        count, index = jax.process_count(), jax.process_index()
        start, stop = len(split) * index // count, len(split) * (index + 1) // count
        if count > 1:
            logging.info("test set %s: process %d decodes rows %d-%d of %d", key, index, start,
                         stop - 1, len(split))  # fmt: skip
        progress = Progress(f"decoding the {key} test images", stop - start, closing=False)
        position = start
        with open(path, "r+b") as f:
            source = _Rows(pipeline.SplitSource(split), start, stop)
            for valid in _decoded_batches(source, image_size, batch_size):
                f.seek(images.offset + position * images.row_bytes)
                f.write(np.ascontiguousarray(valid).data)
                position += len(valid)
                progress(position - start)
            f.flush()
            os.fsync(f.fileno())
        distributed.barrier(f"{path} decoded")
        if distributed.primary():
            with open(done, "w") as f:
                json.dump(identity, f)
        distributed.barrier(f"{path} done")
        return images


@contextlib.contextmanager
def _file_lock(path: str):
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run decoding the same set: wait for it
        yield
    finally:
        os.close(fd)


def subset_targets(info: registry.DatasetInfo, targets) -> np.ndarray:
    """Targets the subset rule stratifies by. Retrieval sets without a class list (MSCOCO,
    Flickr30k) count as one class: Flickr30k's JSON numbers its images 0..999, which would
    make the subset the full set. FSCOCO carries real class labels and is stratified by them."""
    targets = np.asarray(targets, np.int64)
    if info.is_retrieval and not info.num_classes:
        return np.zeros_like(targets)
    return targets


def load_eval_set(
    root,
    key,
    datasets,
    tokenizer,
    image_size,
    *,
    info_dir=None,
    batch_size=256,
    seed=0,
    cache_dir=None,
) -> EvalSet:
    """Read, decode and tokenize one dataset's test split; fix its subset."""
    info = registry.get(key, datasets)
    info_dir = info_dir or fif.default_info_dir(root)
    split = fif.load_split(root, key, "test", info_dir, datasets=datasets)
    if cache_dir is not None:  # on disk: the 63 full test sets exceed most hosts' RAM
        images = cached_images(split, info.key, image_size, cache_dir, batch_size)
    else:  # big sets report while they decode; the caller logs the closing line of each set
        progress = Progress(f"decoding the {info.key} test images", len(split), closing=False)
        images = decode_images(split, image_size, batch_size, progress=progress)
    if info.is_retrieval:
        texts = [c for r in split for c in r.captions]
        owner = np.repeat(np.arange(len(split)), [len(r.captions) for r in split])
    else:
        texts = [info.prompt(n) for n in registry.classnames(info, info_dir)]
        owner = None
    tokens = np.asarray(tokenizer(texts), np.int32)
    s = EvalSet(info.key, info.role, info.is_retrieval, images, tokens, split.targets, owner)
    s.fix_subset(subset_targets(info, split.targets), seed)
    return s


def tower_fingerprints(model) -> tuple[str | None, str | None]:
    """(image, text) digests of everything that can change each tower's embeddings.

    Every leaf of the module's state counts for a tower unless it sits under the other
    tower's prefix or is `logit_scale` (which neither encoder reads), so a parameter outside
    both prefixes (an adapter, say) invalidates both caches rather than wrongly reusing one.
    The config is hashed too (compute dtype, attention). None for objects that are not NNX
    modules: their embeddings are never cached.
    """
    if not isinstance(model, nnx.Module):
        return None, None
    flat = params_lib.flatten(nnx.to_pure_dict(nnx.state(model)))
    digests = {}
    for tower, other in (("image", "text/"), ("text", "image/")):
        h = hashlib.blake2b(repr(getattr(model, "config", type(model))).encode(), digest_size=16)
        for path, leaf in flat.items():
            if path.startswith(other) or path == "logit_scale":
                continue
            if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            array = np.asarray(jax.device_get(leaf))
            h.update(f"{path}:{array.dtype}:{array.shape}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
        digests[tower] = h.hexdigest()
    return digests["image"], digests["text"]


class _TowerCache:
    """Embedding groups computed with one tower's weights; cleared when the weights change."""

    def __init__(self):
        self.fingerprint, self.groups = None, {}

    def get(self, fingerprint, group: str, compute: Callable):
        if fingerprint is None:
            return compute()
        if fingerprint != self.fingerprint:
            self.fingerprint, self.groups = fingerprint, {}
        if group not in self.groups:
            self.groups[group] = compute()
        return self.groups[group]


_to_pixels = jax.jit(lambda images: batch_pixels({"images": images}))


class Placement:
    """How the rows of every evaluation batch are spread over a mesh: split over its batch
    axes (data x fsdp x fsdp_transpose); this process feeds `rows` of each batch and gets all
    the outputs."""

    def __init__(self, mesh, batch_size: int):
        self.sharding = sharding.batch_sharding(mesh)
        ways = sharding.batch_shards(mesh)
        if batch_size % ways:
            raise ValueError(f"eval.batch_size={batch_size} does not split over the mesh's batch "
                             f"axes (data x fsdp x fsdp_transpose = {ways} devices)")  # fmt: skip
        self.rows = distributed.local_rows(self.sharding, batch_size)
        if distributed.multiprocess():
            logging.info("evaluation: process %d feeds rows %d-%d of every batch of %d",
                         jax.process_index(), self.rows[0], self.rows[-1], batch_size)  # fmt: skip

    def put(self, local: np.ndarray) -> jax.Array:
        """The global batch whose rows `self.rows` are `local`."""
        if distributed.multiprocess():
            return jax.make_array_from_process_local_data(self.sharding, local)
        return jax.device_put(local, self.sharding)

    def place(self, model, rules):
        """`model` with its weights on the mesh by `rules` (in place when already there)."""
        graphdef, state = nnx.split(model)
        placed = sharding.shard(nnx.to_pure_dict(state), self.sharding.mesh, rules)
        nnx.replace_by_pure_dict(state, placed)
        return nnx.merge(graphdef, state)


def _batch_rows(segments, seg, row, positions) -> np.ndarray:
    """Rows `positions` of a batch whose row i < len(row) is `segments[seg[i]][0][row[i]]`
    and whose later rows are zeros (padding); only those rows are read."""
    real = positions[positions < len(row)]
    template = segments[int(seg[0])][0]
    parts = [segments[s][0][row[real][seg[real] == s]] for s in np.unique(seg[real])]
    pad = np.zeros((len(positions) - len(real), *template.shape[1:]), template.dtype)
    return np.concatenate([*parts, pad])


IN_FLIGHT = 2  # evaluation batches dispatched ahead of the one being fetched


def embed_rows(encode: Callable, segments, batch_size: int, progress=None, *,
               placement: Placement | None = None, cut=None) -> list[np.ndarray]:  # fmt: skip
    """L2-normalized float32 embeddings of `array[indices]` for each (array, indices) segment.

    The segments run back to back through batches of exactly `batch_size` rows (the last one
    zero padded), so datasets share batches and every call has the same shape. Up to
    `IN_FLIGHT` batches are dispatched ahead of the one being fetched, letting the host gather
    while the device works without holding every batch's inputs at once (a pending call keeps
    its inputs alive on the device). `progress(rows embedded so far)` is called as results
    arrive (see `Progress`): fetching is where the device's work is waited for.

    With a `placement`, this process reads only its rows of each batch and the outputs are
    gathered from every process. `cut(whole batch) -> columns` trims a batch's second axis
    (text: `text_width`), computed from every row so that all processes agree.
    """
    lengths = [len(indices) for _, indices in segments]
    owner = np.repeat(np.arange(len(segments)), lengths)
    rows = np.concatenate([np.asarray(i, np.int64) for _, i in segments] or [np.zeros(0, int)])
    mine = np.arange(batch_size) if placement is None else placement.rows
    pending, fetched, done = collections.deque(), [], 0

    def fetch():
        nonlocal done
        out, n = pending.popleft()
        fetched.append(np.asarray(distributed.to_host(out), np.float32)[:n])
        done += n
        if progress is not None:
            progress(done)

    for start in range(0, len(rows), batch_size):
        seg, row = owner[start : start + batch_size], rows[start : start + batch_size]
        batch = _batch_rows(segments, seg, row, mine)
        if cut is not None:
            batch = batch[:, : cut(_batch_rows(segments, seg, row, np.arange(len(row))))]
        pending.append((encode(batch if placement is None else placement.put(batch)), len(row)))
        if len(pending) > IN_FLIGHT:
            fetch()
    while pending:
        fetch()
    if not fetched:
        return [np.zeros((0, 0), np.float32) for _ in segments]
    emb = np.concatenate(fetched)
    return np.split(_unit(emb), np.cumsum(lengths)[:-1])


def _group_progress(what: str, sets, segments) -> Progress:
    """A `Progress` over segments embedded back to back, naming the dataset reached."""
    ends = np.cumsum([len(indices) for _, indices in segments])

    def where(done: int) -> str:
        number = int(np.searchsorted(ends, done - 1, side="right"))
        return f"at {sets[number].key} ({number + 1}/{len(sets)} datasets)"

    datasets = f"{len(sets)} dataset" + "s" * (len(sets) != 1)
    return Progress(f"{what}, {datasets}", int(ends[-1]) if len(ends) else 0, where=where)


class Evaluator:
    """Zero-shot evaluation of one run: full test sets or the fixed subsets (spec §10).

    Built once per run: reads every dataset's test split, decodes its images once (test
    transform) and tokenizes its prompts or captions. `evaluate` then only runs the towers;
    the embeddings of a tower whose weights did not change since the last call (a locked
    tower, or the same weights evaluated again) are reused.

    Args:
      root, datasets: the data root and the registry of datasets to evaluate (in order).
      tokenizer: texts -> int32 [n, L] with L at most the model's context.
      image_size: side of the test-transformed images.
      info_dir: folder of the info JSONs (default `<root>/00_info`, else `root`).
      batch_size: rows per tower call; every call has this shape (one compilation).
      subset_seed: the experiment seed the fixed subsets derive from.
      cache_dir: when set, decoded images are `.npy` files there, read a batch at a time.
      mesh: when set, every batch is split over the mesh's batch axes (each process reads and
        feeds its rows) and the weights are placed on it by `rules` (the family's).
    """

    def __init__(
        self,
        root,
        datasets,
        tokenizer,
        image_size,
        *,
        info_dir=None,
        batch_size=256,
        subset_seed=0,
        cache_dir=None,
        mesh=None,
        rules=sharding.CLIP_RULES,
    ):
        load = dict(info_dir=info_dir, batch_size=batch_size, seed=subset_seed, cache_dir=cache_dir)
        sets = []
        for number, key in enumerate(datasets, 1):
            start = time.perf_counter()
            s = load_eval_set(root, key, datasets, tokenizer, image_size, **load)
            sets.append(s)
            logging.info("test set %d/%d %s: %d images decoded, %d %s tokenized (%.1fs)",
                         number, len(datasets), s.key, len(s.images), len(s.tokens),
                         "captions" if s.retrieval else "class prompts",
                         time.perf_counter() - start)  # fmt: skip
        self._setup(sets, datasets, batch_size, mesh, rules)

    @classmethod
    def from_sets(cls, sets: Sequence[EvalSet], datasets: dict, batch_size: int = 256, *,
                  mesh=None, rules=sharding.CLIP_RULES):  # fmt: skip
        """An evaluator over prepared `EvalSet`s (e.g. built from arrays in tests)."""
        evaluator = cls.__new__(cls)
        evaluator._setup(list(sets), datasets, batch_size, mesh, rules)
        return evaluator

    def _setup(self, sets, datasets, batch_size, mesh, rules):
        self.sets, self.datasets, self.batch_size = sets, datasets, batch_size
        self.placement = None if mesh is None else Placement(mesh, batch_size)
        self.rules = rules
        self._image_cache, self._text_cache = _TowerCache(), _TowerCache()

    def subset_manifest(self) -> dict:
        """{dataset: subset image indices} for the run manifest."""
        return {s.key: s.subset.tolist() for s in self.sets}

    def _image_group(self, model, subset: bool) -> list[np.ndarray]:
        segments = [(s.images, s.subset if subset else np.arange(len(s.images))) for s in self.sets]
        what = f"embedding test images ({'subset' if subset else 'full'})"
        progress = _group_progress(what, self.sets, segments)
        encode = lambda x: model.encode_image(_to_pixels(x))  # noqa: E731
        return embed_rows(encode, segments, self.batch_size, progress, placement=self.placement)

    def _text_group(self, model, sets, rows, what: str) -> dict:
        segments = [(s.tokens, r) for s, r in zip(sets, rows, strict=True)]
        progress = _group_progress(what, sets, segments)
        cut = None if self.placement is None else text_width  # encode_text cuts host batches
        embeddings = embed_rows(model.encode_text, segments, self.batch_size, progress,
                                placement=self.placement, cut=cut)  # fmt: skip
        return {s.key: e for s, e in zip(sets, embeddings, strict=True)}

    def evaluate(self, model, *, subset: bool) -> dict:
        """{dataset: {"accuracy": %}} or {dataset: {"recall@1": %, "recall@5": %}}.

        Class prompts and captions are embedded in separate batch sequences, so a class
        embedding never depends on whether the subset or the full set is evaluated.
        """
        image_fp, text_fp = tower_fingerprints(model)  # before placing: host-readable weights
        if self.placement is not None:
            model = self.placement.place(model, self.rules)
        scope = "subset" if subset else "full"
        images = self._image_cache.get(image_fp, scope, lambda: self._image_group(model, subset))
        classifiers = [s for s in self.sets if not s.retrieval]
        retrievals = [s for s in self.sets if s.retrieval]
        class_emb = self._text_cache.get(
            text_fp,
            "classes",
            lambda: self._text_group(
                model,
                classifiers,
                [np.arange(len(s.tokens)) for s in classifiers],
                "embedding class prompts",
            ),
        )
        caption_rows = [
            s.subset_captions if subset else np.arange(len(s.tokens)) for s in retrievals
        ]
        caption_emb = self._text_cache.get(
            text_fp,
            f"captions/{scope}",
            lambda: self._text_group(
                model, retrievals, caption_rows, f"embedding test captions ({scope})"
            ),
        )
        results = {}
        for s, image_emb in zip(self.sets, images, strict=True):
            if s.retrieval:
                owner = s.subset_owner if subset else s.owner
                scores = retrieval_scores(image_emb, caption_emb[s.key], owner, ks=(1, 5))
                results[s.key] = {k: scores[k] for k in ("recall@1", "recall@5")}
            else:
                targets = s.targets[s.subset] if subset else s.targets
                results[s.key] = {
                    "accuracy": classification_score(image_emb, class_emb[s.key], targets)
                }
        return results

    def summary(self, results: dict) -> dict:
        """A_KA, A_ZS and GM of `evaluate`'s results (see `headline_metrics`)."""
        return headline_metrics(results, self.datasets)
