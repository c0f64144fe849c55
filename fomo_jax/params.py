"""Parameters as plain nested dicts, addressed by '/'-joined paths.

Models are NNX modules; everything that transforms weights (train steps, sharding rules,
merging, checkpoint conversion) works on the pure pytree `split(model)` returns, so those
functions stay pure and jittable. A path looks like
`image/transformer/resblocks/3/attn/q_proj/kernel`.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

Params = dict[str, Any]


def split(model: nnx.Module):
    """(graphdef, params): the static structure and a nested dict of parameter arrays."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def merge(graphdef, params: Params) -> nnx.Module:
    """A module with `params` as its weights (the arrays are used as they are, not copied)."""
    return nnx.merge(graphdef, params)


def key_path_str(key_path) -> str:
    """'a/b/0/c' from a jax key path; only dict keys and indices count, so the path of an
    optimizer-state leaf (e.g. `.mu['image'][...]`) equals the path of its parameter."""
    parts = []
    for key in key_path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey) and parts:
            parts.append(str(key.idx))
    return "/".join(parts)


def flatten(params: Params) -> dict[str, Any]:
    """{'a/b/c': leaf} in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {key_path_str(path): leaf for path, leaf in leaves}


def unflatten(flat: dict[str, Any]) -> Params:
    """Inverse of `flatten`; numeric path parts become int keys (as NNX lists use)."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = leaf
    return tree


def partition(params: Params, select) -> tuple[Params, Params]:
    """(selected, rest): the leaves whose path `select(path)` accepts, and the others, each a
    nested dict of the same layout (a side may be empty). Works on traced values."""
    flat = flatten(params)
    chosen = {k: v for k, v in flat.items() if select(k)}
    return unflatten(chosen), unflatten({k: v for k, v in flat.items() if k not in chosen})


def combine(*trees: Params) -> Params:
    """Inverse of `partition`: one nested dict holding the leaves of all `trees`."""
    flat: dict[str, Any] = {}
    for tree in trees:
        flat.update(flatten(tree))
    return unflatten(flat)
