"""One device mesh with named axes, and sharding as data: ordered (regex -> PartitionSpec) rules.

Axes: `data` (batch only), `fsdp` (batch, and parameters/optimizer state split across it),
`model` (tensor parallel: attention heads and MLP hidden units). Rules are matched in order
against a parameter's '/'-joined path (first match wins, unmatched leaves are replicated).
The same rules shard the optimizer state, whose moment leaves have their parameter's path.
A mesh axis that does not divide a dimension is dropped for that leaf (e.g. a 259-token
vocabulary over 4 fsdp shards), so one rule list serves every mesh shape.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from fomo_jax import params as params_lib

AXES = ("data", "fsdp", "model")
BATCH = ("data", "fsdp")  # the batch dimension is split over both

Rules = Sequence[tuple[str, P]]

# Megatron-style tensor parallelism (column-split in, row-split out) combined with FSDP on
# the other dimension of every large matrix.
CLIP_RULES: Rules = (
    (r"attn/(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "model")),
    (r"attn/(q_proj|k_proj|v_proj)/bias$", P("model")),
    (r"attn/out_proj/kernel$", P("model", "fsdp")),
    (r"mlp/c_fc/kernel$", P("fsdp", "model")),
    (r"mlp/c_fc/bias$", P("model")),
    (r"mlp/c_proj/kernel$", P("model", "fsdp")),
    (r"token_embedding/embedding$", P("fsdp", None)),
    (r"patch_embed$", P(None, None, None, "fsdp")),
    (r"(image|text)/proj$", P("fsdp", None)),
    (r".*", P()),
)

# Decoder LMs (`models/llama.py`: q/k/v as above) and the VLM (`models/vlm.py`: its image
# tower is CLIP's; its connectors, `models/connectors.py`: the MLPs' first linear column-split,
# their second row-split; the Perceiver's attention and SwiGLUs as the LM's), in the same
# Megatron x FSDP pattern. The vocabulary dimension of the embedding and the output head is
# split over `model`.
LM_RULES: Rules = (
    (r"attn/o_proj/kernel$", P("model", "fsdp")),
    (r"(mlp|modality_projection)/(gate_proj|up_proj)/kernel$", P("fsdp", "model")),
    (r"mlp/(gate_proj|up_proj)/bias$", P("model")),
    (r"(mlp|modality_projection)/down_proj/kernel$", P("model", "fsdp")),
    (r"embed_tokens/embedding$", P("model", "fsdp")),
    (r"lm_head/kernel$", P("fsdp", "model")),
    (r"connector/(linear|linear_1)/kernel$", P("fsdp", "model")),
    (r"connector/(linear|linear_1)/bias$", P("model")),
    (r"connector/linear_2/kernel$", P("model", "fsdp")),
    *CLIP_RULES,
)


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1, devices=None, *,
              dcn_data: int = -1) -> jax.sharding.Mesh:  # fmt: skip
    """A (data, fsdp, model) mesh with Auto axis types; data=-1 takes the remaining devices.

    Hosts and slices: `dcn_data` > 1 splits the data axis over that many granules (TPU slices
    when the devices span several, else processes) joined by the slow network, and lays fsdp
    and model out inside each granule (`mesh_utils.create_hybrid_device_mesh`); only the
    gradient all-reduce of data parallelism then crosses the slow links. -1 (the default)
    is the number of TPU slices when there are several, else 1: one granule, the devices in
    `jax.make_mesh`'s order, where the outermost axis (data) changes process first. The log
    says which axes cross processes (`describe`).
    """
    devices = list(jax.devices() if devices is None else devices)
    if data == -1:
        if len(devices) % (fsdp * model):
            raise ValueError(
                f"{len(devices)} devices cannot be split into fsdp={fsdp} x model={model}"
            )
        data = len(devices) // (fsdp * model)
    if data * fsdp * model != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x model={model} needs "
            f"{data * fsdp * model} devices, have {len(devices)}"
        )
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if dcn_data == -1:
        dcn_data = slices if slices > 1 else 1
    axis_types = (AxisType.Auto,) * 3
    if dcn_data == 1:
        mesh = jax.make_mesh((data, fsdp, model), AXES, axis_types=axis_types, devices=devices)
    else:
        mesh = jax.sharding.Mesh(hybrid_grid(data, fsdp, model, devices, dcn_data, slices > 1),
                                 AXES, axis_types=axis_types)  # fmt: skip
    if len({d.process_index for d in devices}) > 1:
        logging.info("%s", describe(mesh))
    return mesh


def hybrid_grid(data: int, fsdp: int, model: int, devices, dcn_data: int,
                by_slice: bool) -> np.ndarray:  # fmt: skip
    """The [data, fsdp, model] array of devices whose data axis spans `dcn_data` granules
    (slices if `by_slice`, else processes), each granule holding data/dcn_data x fsdp x model."""
    granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    if dcn_data != granules or data % dcn_data:
        kind = "TPU slices" if by_slice else "processes"
        raise ValueError(f"mesh.dcn_data={dcn_data} must be the number of {kind} ({granules}) "
                         f"and divide mesh data={data} (mesh.dcn_data=1: a mesh laid out "
                         "without regard to slices or hosts)")  # fmt: skip
    inner, outer = (data // dcn_data, fsdp, model), (dcn_data, 1, 1)
    return mesh_utils.create_hybrid_device_mesh(inner, outer, devices,
                                                process_is_granule=not by_slice)  # fmt: skip


def describe(mesh) -> str:
    """Which axes of `mesh` cross processes (hosts), e.g. "mesh data=2 x fsdp=2 x model=1 on
    2 processes: data crosses processes; fsdp, model stay within one"."""
    processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
    crossing = [name for axis, name in enumerate(mesh.axis_names)
                if (np.diff(processes, axis=axis) != 0).any()]  # fmt: skip
    within = [name for name in mesh.axis_names if name not in crossing]
    shape = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
    text = (
        f"mesh {shape} on {len(np.unique(processes))} processes: "
        f"{', '.join(crossing) or 'no axis'} cross{'es' * (len(crossing) == 1)} processes"
    )
    if within:
        text += f"; {', '.join(within)} stay{'s' * (len(within) == 1)} within one"
    if "model" in crossing:
        text += " (tensor parallelism over the slow links: keep mesh.model within a host)"
    return text


def spec_for(path: str, shape: tuple, rules: Rules, mesh) -> P:
    """The first matching rule's spec, with axes that do not divide the dimension removed."""
    match = next(((pat, spec) for pat, spec in rules if re.search(pat, path)), None)
    if match is None:
        return P()
    pattern, spec = match
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {pattern!r} -> {spec} has more dims than {path} {shape}")
    dims = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        count = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        if size % count:
            logging.debug(
                "sharding: %s dim of size %d not divisible by %s; replicated", path, size, names
            )
            axes = None
        dims.append(axes)
    while dims and dims[-1] is None:  # P(None,) and P() mean the same; keep the short form
        dims.pop()
    return P(*dims)


def tree_shardings(tree, mesh, rules: Rules = CLIP_RULES):
    """NamedShardings for every leaf (arrays or ShapeDtypeStructs) of a params/opt-state tree."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(params_lib.key_path_str(path), shape, rules, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def shard(tree, mesh, rules: Rules = CLIP_RULES):
    """Place a tree on the mesh according to the rules."""
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def batch_shards(mesh) -> int:
    """The number of pieces a batch is split into: data x fsdp."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH]))


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
