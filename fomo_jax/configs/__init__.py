"""The packaged experiment configs, and `--config` values that name them.

`--config` takes a path (`configs/fif_synth.py:smoke`, any file with `get_config(arg)`) or the
name of a config shipped in this folder (`fif_synth`, `fif_synth:smoke`, `fif`, `clip_synth`),
so the command works from any folder after a non-editable install. The text after the first
`:` is passed to `get_config`.
"""

from __future__ import annotations

import os
import re

DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The packaged configs: every module of this folder but the package itself."""
    return sorted(
        entry[:-3]
        for entry in os.listdir(DIR)
        if entry.endswith(".py") and not entry.startswith("_")
    )


def resolve(value: str) -> str:
    """A `--config` value as config_flags reads it: a packaged name becomes its file's path.

    'fif_synth:smoke' -> '<this folder>/fif_synth.py:smoke' (a packaged name always means the
    packaged config); any other value must be an existing file and stays as given. A value that
    is neither is refused here, naming it, rather than by config_flags, which only fails once
    the config is first read.
    """
    path, sep, arg = value.partition(":")
    if path in names():
        return os.path.join(DIR, path + ".py") + sep + arg
    if os.path.isfile(path):
        return value
    raise ValueError(
        f"--config={value}: {path!r} is neither a config file nor a packaged config "
        f"(one of {', '.join(names())}, each optionally followed by :ARG)"
    )


def run_name(value: str) -> str:
    """The name a run of this config gets by default: 'fif_synth', 'fif_synth_smoke', ...

    The argument is part of it because it changes the config, and a work directory refuses a
    run with another config than its own.
    """
    path, _, arg = value.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{name}_{arg}" if arg else name)


def short(value: str) -> str:
    """A resolved `--config` value as a user writes it: '<this folder>/fif.py:x' -> 'fif:x'."""
    path, sep, arg = value.partition(":")
    if os.path.dirname(os.path.abspath(path)) == DIR:
        return os.path.splitext(os.path.basename(path))[0] + sep + arg
    return value
