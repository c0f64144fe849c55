"""Reader for the released FoMo-in-Flux layout (spec/fif.md §2.4-2.5).

An info JSON per split maps an image path (relative to `<data_root>/<NAME>/`) to a record with
`classname`, `target` and caption fields. `load_split` turns one into a list of `Record`s with
the candidate training texts already chosen by the caption policy, so that the rest of the
pipeline never looks at the JSON again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from fomo_jax.data import registry

INFO_SUBDIR = "00_info"  # where the reference keeps its info JSONs (data_lib/00_info)


@dataclasses.dataclass(frozen=True)
class Record:
    """One image of a split. `captions` are the candidate texts, verbatim, in JSON order."""

    image_path: str
    target: int
    classname: str | None
    captions: list[str]
    dataset: str  # registry key
    key: str  # the image's key in the info JSON
    caption_source: str  # "default_caption", "synthetic_merged_caption" or "primer"

    def __getitem__(self, field: str):  # records also read like dicts: record["captions"]
        return getattr(self, field)


class Split(list):
    """The records of one split, plus what the reader noticed while building it."""

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
) -> Split:
    """Records of a logical split ("train"/"test") of a dataset in the released layout.

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
    """
    info = registry.get(dataset, datasets)
    info_dir = info_dir or default_info_dir(data_root)
    path = os.path.join(info_dir, info.info_filename(split))
    entries = read_info_json(path)

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
        if check_images and not os.path.exists(image_path):
            if not skip_missing:
                raise FileNotFoundError(f"{where}: image file missing: {image_path}")
            skipped.append((key, "missing image"))
            continue
        fallbacks += source == "primer"
        records.append(Record(image_path, target, classname, captions, info.key, key, source))
    return Split(
        records, dataset=info.key, split=split, info_path=path, skipped=skipped, fallbacks=fallbacks
    )


def choose_caption(captions: Sequence[str], rng: np.random.Generator | None) -> str:
    """Training (rng given): a uniformly random candidate. Test (rng None): the first."""
    if rng is None or len(captions) == 1:
        return captions[0]
    return captions[int(rng.integers(len(captions)))]
