"""Offline merge of CLIP checkpoints by any merge function of `fomo_jax.merging`.

    fomo-jax merge --base=theta0/ --models=ft_a/,ft_b/ --out=merged/ --method=ties \
        --option=prune_fraction=0.2
    fomo-jax merge --base=theta0/ --models=a/,b/,c/ --out=avg/ --method=interpolation

The base (θ0, the anchor of the task vectors) and the fine-tuned models are anything
`fomo_jax.models.load_pretrained` reads (HF CLIP directories, OpenCLIP files, a run's
`model/`), all of one architecture. The result is a HF CLIP directory at `out`, with the
base directory's tokenizer and preprocessor files copied next to it and `merge.json`
recording what was merged and how.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
import shutil
from collections.abc import Sequence

import jax

from fomo_jax import merging
from fomo_jax import models as models_lib
from fomo_jax import params as params_lib

# Files of a HF directory that tokenize and preprocess for the model; a merge keeps them.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "preprocessor_config.json",
)
# Positional inputs of the merge functions: not options a user sets.
_INPUTS = {"base", "trees", "tree_a", "tree_b", "key"}


def merge_checkpoints(
    base: str, models: Sequence[str], out: str, *, method: str, **merge_kwargs
) -> str:
    """Merge the checkpoints `models` with anchor `base` by `method` and export to `out`.

    `merge_kwargs` are the merge function's options (e.g. prune_fraction=0.2 for ties,
    weights=[0.3, 0.7] or weighting="linear" for interpolation); `seed` (default 0) makes the
    key of the randomised merges (dare_ties, random). Returns `out`."""
    name = merging.canonical_name(method)  # an unknown name lists the known ones
    options, seed = _check_options(name, merge_kwargs)
    if not models:
        raise ValueError("merge needs at least one model besides the base")
    logging.info("merge: loading the base %s and %d models", base, len(models))
    base_model = _load(base)
    graphdef, base_params = params_lib.split(base_model)
    trees = []
    for path in models:
        model = _load(path)
        _check_same_architecture(base, base_model, path, model)
        trees.append(params_lib.split(model)[1])
    key = jax.random.key(seed) if name in merging.NEEDS_KEY else None
    logging.info("merge: %s %s", name, options)
    merged = merging.merge(name, base_params, trees, key=key, **options)
    models_lib.export_hf(params_lib.merge(graphdef, jax.device_get(merged)), out)
    copied = _copy_processor_files(base, out)
    record = dict(base=os.path.abspath(base), models=[os.path.abspath(p) for p in models],
                  method=name, options=options, seed=seed if key is not None else None,
                  processor_files=copied)  # fmt: skip
    with open(os.path.join(out, "merge.json"), "w") as f:
        json.dump(record, f, indent=1, default=str)
    logging.info("merge: wrote %s", out)
    return out


def merge_options(name: str) -> list[str]:
    """The options merge `name` takes (its keyword parameters), e.g. for --help."""
    name = merging.canonical_name(name)
    accepted = [p for p in inspect.signature(merging.MERGES[name]).parameters if p not in _INPUTS]
    if name == "interpolation":
        accepted.append("weighting")  # §8.3 weightings, resolved by merging.merge
    if name in merging.NEEDS_KEY:
        accepted.append("seed")
    return accepted


def _check_options(name: str, options: dict) -> tuple[dict, int]:
    """(the merge function's options, the seed); an option it does not take is an error."""
    options = dict(options)
    accepted = merge_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"merge {name!r} takes no option {unknown}; it takes {accepted}")
    return options, int(options.pop("seed", 0))


def _load(path: str):
    model = models_lib.load_pretrained(path)
    if not isinstance(model, models_lib.CLIP):
        raise ValueError(f"{path}: a {type(model).__name__}, not a CLIP checkpoint")
    return model


def _check_same_architecture(base_path, base, path, model) -> None:
    """Task vectors need one architecture: every config field (widths, depths, heads,
    vocabulary, image size, activation) equal to the base's."""
    if model.config == base.config:
        return
    differ = [
        f"{f.name}: {getattr(model.config, f.name)} vs {getattr(base.config, f.name)}"
        for f in dataclasses.fields(base.config)
        if getattr(model.config, f.name) != getattr(base.config, f.name)
    ]
    raise ValueError(
        f"{path} is not the architecture of the base {base_path} ({'; '.join(differ)}); "
        "merging needs one architecture"
    )


def _copy_processor_files(base: str, out: str) -> list[str]:
    """Copy the base directory's tokenizer / preprocessor files, so that the merged directory
    tokenizes and preprocesses as the base does (nothing for a base file)."""
    if not os.path.isdir(base):
        return []
    copied = []
    for name in PROCESSOR_FILES:
        source = os.path.join(base, name)
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(out, name))
            copied.append(name)
    return copied
