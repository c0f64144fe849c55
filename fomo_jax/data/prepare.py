"""`fomo-jax prepare`: a benchmark's splits, a TFDS dataset or an image folder -> record shards.

The released FoMo-in-Flux data is ≈2.2M small image files (spec/fif.md §2.4). `prepare_benchmark`
writes the images of every split a run reads (the train splits of the adaptation datasets, the
test split of every dataset) once as JPEG ArrayRecord shards (`records.convert`), each into

    <out>/00_records/<NAME>_<split>[_224]/      (named after the info JSON it was made from)

and `fif.load_split` reads a split's images from there whenever its shards exist, so training
and evaluation open a few shard files instead of millions of images; the info JSONs stay the
source of targets, class names and captions. `out` defaults to the data root itself; another
folder becomes a data root of its own (the info JSONs, class lists, streams and top-level
JSON files copied, the pretraining pool linked), so the shards can live on a faster disk than
the images: pass it as `--config.data.root`.

Shards hold re-encoded images (the shorter side at most `image_size`, JPEG quality 95, 4:4:4;
see `records`), so scores over prepared data are close to, not bit-identical with, scores over
the image files. A rerun resumes: finished shards are kept.

`from_image_folder` and `records.from_tfds` make sources of other data (e.g. a pretraining pool
of your own, read by `--config.data.pretraining_pool`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable, Sequence

from fomo_jax.data import fif, records, registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One prepared split: where its shards are and what `records.convert` did."""

    dataset: str
    split: str
    path: str
    num_records: int
    written: int  # shards written by this call
    kept: int  # shards kept from an earlier call


def benchmark_registry(data_root: str) -> dict[str, registry.DatasetInfo] | None:
    """The datasets of the benchmark under `data_root`: a generated one's `datasets.json`
    (fif_synth), else None, which readers take as the 63 FoMo-in-Flux datasets."""
    path = os.path.join(data_root, "datasets.json")
    return registry.load_datasets(path) if os.path.isfile(path) else None


def benchmark_splits(
    datasets: dict[str, registry.DatasetInfo] | None, only: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """(dataset key, split) pairs a run reads: train of the adaptation datasets, test of all.

    `only` restricts them to the named datasets (keys or folder spellings)."""
    table = registry.DATASETS if datasets is None else datasets
    keys = list(table)
    if only:
        keys = [registry.get(name, datasets).key for name in only]
    pairs = []
    for key in keys:
        info = table[key]
        if info.role == "adaptation" and info.train_split is not None:
            pairs.append((key, "train"))
        pairs.append((key, "test"))
    return pairs


def prepare_benchmark(
    data_root: str,
    out: str | None = None,
    *,
    datasets: Sequence[str] | None = None,
    info_dir: str | None = None,
    classnames_dir: str | None = None,
    image_size: int | None = 224,
    quality: int = 95,
    records_per_shard: int | None = None,
    num_workers: int | None = None,
    skip_bad: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[Prepared]:
    """Write the splits of the benchmark under `data_root` as record shards under `out`.

    Args:
      data_root: the released layout (`<NAME>/` image folders, `00_info/`), or fif_synth.
      out: the data root the shards go into (default `data_root`); another folder is made a
        complete data root (see the module docstring).
      datasets: only these datasets (keys or folder names); default every dataset.
      info_dir, classnames_dir: as in `fif.load_split`.
      image_size, quality, records_per_shard, num_workers, skip_bad: as in `records.convert`
        (`skip_bad` also leaves out entries whose image file is missing).
      progress: called with a line per split.
    """
    out = data_root if out is None else out
    registry_of = benchmark_registry(data_root)
    info_dir = info_dir or fif.default_info_dir(data_root)
    names_dir = classnames_dir or info_dir
    done = []
    for key, split in benchmark_splits(registry_of, datasets):
        info = registry.get(key, registry_of)
        source_split = fif.load_split(
            data_root,
            key,
            split,
            info_dir,
            classnames_dir=classnames_dir,
            skip_missing=skip_bad,
            datasets=registry_of,
            use_records=False,
        )
        names = None
        if not info.is_retrieval and os.path.exists(registry.classnames_path(info, names_dir)):
            names = registry.classnames(info, names_dir)
        path = fif.records_dir(out, info, split)
        result = records.convert(
            records.from_fif_split(source_split, names),
            path,
            records_per_shard=records_per_shard,
            image_size=image_size,
            quality=quality,
            num_workers=num_workers,
            skip_bad=skip_bad,
        )
        prepared = Prepared(
            key, split, path, result.manifest["num_records"], len(result.written), len(result.kept)
        )
        done.append(prepared)
        if progress is not None:
            progress(
                f"{key} {split}: {prepared.num_records} records -> {path} "
                f"({prepared.written} shards written, {prepared.kept} kept)"
            )
    if os.path.abspath(out) != os.path.abspath(data_root):
        make_data_root(data_root, out, info_dir)
    return done


def make_data_root(data_root: str, out: str, info_dir: str) -> None:
    """Make `out` a data root of its own: the info folder (into `00_info/`), `streams/` and the
    top-level JSON files (fif_synth's `datasets.json`, `manifest.json`) copied, `pretraining/`
    linked (it is not converted: WebDataset shards are read as they are)."""
    shutil.copytree(info_dir, os.path.join(out, fif.INFO_SUBDIR), dirs_exist_ok=True)
    streams = os.path.join(data_root, "streams")
    if os.path.isdir(streams):
        shutil.copytree(streams, os.path.join(out, "streams"), dirs_exist_ok=True)
    for name in os.listdir(data_root):
        if name.endswith(".json") and os.path.isfile(os.path.join(data_root, name)):
            shutil.copy2(os.path.join(data_root, name), os.path.join(out, name))
    pool, link = os.path.join(data_root, "pretraining"), os.path.join(out, "pretraining")
    if os.path.isdir(pool) and not os.path.lexists(link):
        os.symlink(os.path.abspath(pool), link)
        logging.info("linked the pretraining pool %s -> %s", link, pool)


# ---------------------------------------------------------------------------------------------
# Image folders


@dataclasses.dataclass(frozen=True)
class _FolderAdapter:
    root: str
    dataset: str
    template: str
    names: tuple[str, ...]

    def __call__(self, index: int, item: tuple[str, int]) -> records.Example:
        relative, target = item
        path = os.path.join(self.root, relative)
        caption_file = os.path.splitext(path)[0] + ".txt"
        if os.path.isfile(caption_file):
            with open(caption_file, encoding="utf-8") as f:
                captions = [line.strip() for line in f if line.strip()]
        else:
            captions = [self.template.format(self.names[target])]
        return records.Example(
            image=path,
            captions=captions,
            target=target,
            classname=self.names[target],
            dataset=self.dataset,
            key=relative,
            origin=path,
        )


def from_image_folder(
    root: str, *, template: str = "A photo of a {}.", dataset: str | None = None
) -> records.Source:
    """`<root>/<class>/**/<image>`: one class per subfolder (sorted names, index = target).

    An image's texts are the non-empty lines of a `.txt` file of the same name beside it, else
    `template` filled with its class name. The key is the path relative to `root`.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise ValueError(f"{root}: no class subfolders (expected <root>/<class>/<image>)")
    items = []
    for target, name in enumerate(names):
        for folder, subfolders, files in os.walk(os.path.join(root, name)):
            subfolders.sort()
            for file in sorted(files):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.relpath(os.path.join(folder, file), root), target))
    if not items:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its subfolders")
    dataset = dataset or os.path.basename(os.path.normpath(root))
    return records.Source(
        items=items,
        adapter=_FolderAdapter(os.path.abspath(root), dataset, template, tuple(names)),
        description={
            "kind": "image_folder",
            "path": os.path.abspath(root),
            "template": template,
            "num_classes": len(names),
        },
        dataset=dataset,
        classnames=names,
    )
