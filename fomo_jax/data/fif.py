"""Reader for the released FoMo-in-Flux layout (spec/fif.md §2.4-2.5).

An info JSON per split maps an image path (relative to `<data_root>/<NAME>/`) to a record with
`classname`, `target` and caption fields. `load_split` turns one into a list of `Record`s with
the candidate training texts already chosen by the caption policy, so that the rest of the
pipeline never looks at the JSON again.

Prepared splits: when `fomo-jax prepare` (`fomo_jax.data.prepare`) has written a split's images
as ArrayRecord shards into `<data_root>/00_records/<info JSON name>/`, `load_split` still reads
the info JSON (targets, class names and captions as above) but takes the images from the shards
(a `ShardSplit`), so nothing opens the individual image files: every reader of splits (training
pools, evaluation) gets them without a change.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from fomo_jax.data import registry

INFO_SUBDIR = "00_info"  # where the reference keeps its info JSONs (data_lib/00_info)
RECORDS_SUBDIR = "00_records"  # prepared shards of the splits (`fomo-jax prepare`)
RECORDS_MANIFEST = "manifest.json"  # records.MANIFEST: written last, so its presence = complete


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of a split. `captions` are the candidate texts, verbatim, in JSON order.

    `image_path` is the image file; in a split read from prepared shards (`ShardSplit`),
    `image_bytes` holds the encoded image and the file need not exist. `image` is what to
    decode (`transforms.decode_rgb` takes either)."""

    image_path: str
    target: int
    classname: str | None
    captions: list[str]
    dataset: str  # registry key
    key: str  # the image's key in the info JSON
    caption_source: str  # "default_caption", "synthetic_merged_caption" or "primer"
    image_bytes: bytes | None = None

    @property
    def image(self) -> str | bytes:
        return self.image_path if self.image_bytes is None else self.image_bytes

    def __getitem__(self, field: str):  # records also read like dicts: record["captions"]
        return getattr(self, field)


SPLIT_FIELDS = ("dataset", "split", "info_path", "skipped", "fallbacks")


class Split(list):
    """The records of one split, plus what the reader noticed while building it."""

    records_dir: str | None = None  # the prepared shards the images come from (ShardSplit)

    def __init__(self, records, *, dataset, split, info_path, skipped=(), fallbacks=0):
        super().__init__(records)
        self.dataset = dataset
        self.split = split
        self.info_path = info_path
        self.skipped = list(skipped)  # (key, reason) of records left out on request
        self.fallbacks = fallbacks  # records whose text fell back to the primer (spec §2.5 [FIX])

    @property
    def targets(self) -> np.ndarray:
        return np.array([r.target for r in self], np.int64)


class ShardSplit(Split):
    """A split whose images come from prepared ArrayRecord shards (`fomo-jax prepare`).

    The list holds the records of the info JSON without their images, so `len`, `targets` and
    comparisons read nothing; indexing and iteration return each record with `image_bytes` set
    to its encoded image, read from the shards then. Record i of the split is record i of the
    shards: the shards keep the info JSON's order and the stored key is checked on every read.
    """

    def __init__(self, records, source, **split_fields):
        super().__init__(records, **split_fields)
        self.source = source  # a records.RecordSource
        self.records_dir = source.path
        stale = f"prepared shards {source.path} do not match {self.info_path}"
        if len(source) != len(self):
            raise ValueError(
                f"{stale}: {len(source)} records for {len(self)} images (run fomo-jax prepare "
                "again)"
            )
        if not np.array_equal(source.targets, self.targets):
            raise ValueError(f"{stale}: the targets differ (run fomo-jax prepare again)")

    @property
    def targets(self) -> np.ndarray:
        return np.array([r.target for r in list.__iter__(self)], np.int64)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        position = range(len(self))[index]  # negative indices too; IndexError past the end
        record = list.__getitem__(self, position)
        stored = self.source[position]
        if stored["key"] != record.key:
            raise ValueError(
                f"prepared shards {self.records_dir}: record {position} holds {stored['key']!r}, "
                f"{self.info_path} has {record.key!r} there (run fomo-jax prepare again)"
            )
        return dataclasses.replace(record, image_bytes=stored["image"])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __reduce__(self):  # pickled without the images (pickle would iterate, reading them)
        fields = {name: getattr(self, name) for name in SPLIT_FIELDS}
        return _unpickle_shard_split, (list(list.__iter__(self)), self.source, fields)


def _unpickle_shard_split(records, source, fields) -> ShardSplit:
    return ShardSplit(records, source, **fields)


def records_dir(data_root: str, info: registry.DatasetInfo, split: str) -> str:
    """`<data_root>/00_records/<NAME>_<split>[_224]`: where the prepared shards of a split go
    (named after the info JSON they were made from) and where `load_split` looks for them."""
    stem = os.path.splitext(info.info_filename(split))[0]
    return os.path.join(data_root, RECORDS_SUBDIR, stem)


def _left_out(shards: str) -> dict[str, str]:
    """{info-JSON key: reason} of the entries a preparation left out (unreadable images)."""
    with open(os.path.join(shards, RECORDS_MANIFEST)) as f:
        manifest = json.load(f)
    return {entry["key"]: entry["reason"] for entry in manifest["skipped"]}


def default_info_dir(data_root: str) -> str:
    """`<data_root>/00_info` when it exists, else the data root itself."""
    candidate = os.path.join(data_root, INFO_SUBDIR)
    return candidate if os.path.isdir(candidate) else data_root


def _caption_list(value, field: str, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value) or None
    raise ValueError(f"{where}: {field} must be null, a string or a list of strings")


def captions_of(entry: dict, info: registry.DatasetInfo, where: str) -> tuple[list[str], str]:
    """The caption policy of spec §2.5, applied per record: (candidate texts, their source)."""
    for field in ("default_caption", "synthetic_merged_caption"):
        captions = _caption_list(entry.get(field), field, where)
        if captions:
            return captions, field
    classname = entry.get("classname")
    if classname is None:
        raise ValueError(f"{where}: no caption and no classname to build a primer from")
    return [info.prompt(classname)], "primer"


def read_info_json(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"info JSON not found: {path}")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed info JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping image paths to records")
    return data


def load_split(
    data_root: str,
    dataset: str,
    split: str,
    info_dir: str | None = None,
    *,
    classnames_dir: str | None = None,
    check_images: bool = True,
    skip_missing: bool = False,
    datasets: dict[str, registry.DatasetInfo] | None = None,
    use_records: bool = True,
) -> Split:
    """Records of a logical split ("train"/"test") of a dataset in the released layout.

    With prepared shards of the split under `records_dir(data_root, ...)` (and `use_records`),
    the images come from them (a `ShardSplit`): no image file is opened or checked, and an entry
    the preparation left out counts as a missing image.

    Args:
      data_root: folder holding `<NAME>/` image folders.
      dataset: the upper-case NAME (any accepted spelling) or the lower-case key.
      split: "train" or "test", mapped to the dataset's file split names.
      info_dir: folder of the info JSONs (default `<data_root>/00_info`, else `data_root`).
      classnames_dir: folder of `<NAME>_classnames.json` (default `info_dir`). When the list is
        there, every record's target and classname are checked against it.
      check_images: stop (or skip) on records whose image file is missing.
      skip_missing: leave out records with a missing image and list them in `Split.skipped`.
      datasets: a registry other than the 63 benchmark datasets (e.g. fif_synth's).
      use_records: read the images from the split's prepared shards when there are some
        (False: always from the image files, as `fomo-jax prepare` itself does).
    """
    info = registry.get(dataset, datasets)
    info_dir = info_dir or default_info_dir(data_root)
    path = os.path.join(info_dir, info.info_filename(split))
    entries = read_info_json(path)
    shards = records_dir(data_root, info, split)
    prepared = use_records and os.path.isfile(os.path.join(shards, RECORDS_MANIFEST))
    left_out = _left_out(shards) if prepared else {}

    names = None
    names_path = registry.classnames_path(info, classnames_dir or info_dir)
    if not info.is_retrieval and os.path.exists(names_path):
        names = registry.classnames(info, classnames_dir or info_dir)

    records, skipped, fallbacks = [], [], 0
    for key, entry in entries.items():
        where = f"{path} [{key!r}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: record must be an object")
        target, classname = entry.get("target"), entry.get("classname")
        if not isinstance(target, int) or isinstance(target, bool):
            raise ValueError(f"{where}: 'target' must be an integer, got {target!r}")
        if classname is not None and not isinstance(classname, str):
            raise ValueError(f"{where}: 'classname' must be a string or null")
        if names is not None:
            if not 0 <= target < len(names) or names[target] != classname:
                raise ValueError(
                    f"{where}: target {target} / classname {classname!r} disagree with {names_path}"
                )
        captions, source = captions_of(entry, info, where)
        image_path = os.path.join(data_root, info.name, key)
        missing = None
        if key in left_out:
            missing = f"image left out of the prepared shards {shards}: {left_out[key]}"
        elif check_images and not prepared and not os.path.exists(image_path):
            missing = f"image file missing: {image_path}"
        if missing is not None:
            if not skip_missing:
                raise FileNotFoundError(f"{where}: {missing}")
            skipped.append((key, "missing image"))
            continue
        fallbacks += source == "primer"
        records.append(Record(image_path, target, classname, captions, info.key, key, source))
    fields = dict(
        dataset=info.key, split=split, info_path=path, skipped=skipped, fallbacks=fallbacks
    )
    if prepared:
        from fomo_jax.data.records import RecordSource  # records imports this module

        return ShardSplit(records, RecordSource(shards), **fields)
    return Split(records, **fields)


def choose_caption(captions: Sequence[str], rng: np.random.Generator | None) -> str:
    """Training (rng given): a uniformly random candidate. Test (rng None): the first."""
    if rng is None or len(captions) == 1:
        return captions[0]
    return captions[int(rng.integers(len(captions)))]
