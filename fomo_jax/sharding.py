"""One device mesh with named axes, and sharding as data: ordered (regex -> PartitionSpec) rules.

Axes: `data` (batch only), `fsdp` (batch, and parameters/optimizer state split across it),
`fsdp_transpose` (a second FSDP axis, as MaxText's: batch, and wherever a rule names `fsdp`;
see below), `model` (tensor parallel: attention heads and MLP hidden units). Rules are matched
in order against a parameter's '/'-joined path (first match wins, unmatched leaves are
replicated).
The same rules shard the optimizer state, whose moment leaves have their parameter's path.

A mesh axis that does not divide its dimension (together with the axes before it on that
dimension) is handled by leaf size, so that one rule list serves every mesh shape:
  * small leaves (at most `REPLICATE_MAX_BYTES`, 1 MiB, in their dtype) drop the axis and are
    replicated over it (e.g. a 259-token vocabulary over 4 fsdp shards); they cost little
    memory, and small models keep the shardings they always had;
  * larger leaves move the axis to another dimension that it divides and that no other axis
    (of size > 1) splits, the largest such one: ViT-g-14's MLP kernel [1408, 6144] under
    `P("fsdp", "model")` at fsdp=256 x model=1 gets `P(None, ("model", "fsdp"))`;
  * a larger leaf with no such dimension is a ValueError naming the leaf, its shape and the
    axis, never a silent replicate (but a leaf that `fsdp` splits may stay unsplit over
    `fsdp_transpose`, e.g. ViT-bigG-14's positional embedding [257, 1664]). ViT-g-14's
    [1408, 1408] attention kernels at fsdp=256 are one (1408 = 11 x 128: no even split over
    256 exists); the message names the largest size of the axis that would split the leaf,
    here 128, and the two-axis mesh to try.
A width that no FSDP degree of the mesh divides (ViT-bigG-14's 1664 = 13 x 128 at 256 devices)
is split two ways by `fsdp_transpose`: a rule's `fsdp` stands for (`fsdp`, `fsdp_transpose`);
fsdp=128 x fsdp_transpose=2 splits [1664, 1664] as P("fsdp", "fsdp_transpose") and the patch
embedding [14, 14, 3, 1664] as P("fsdp_transpose", None, None, "fsdp") by the fallback above,
every large leaf 256 ways. With fsdp_transpose=1 (the default) every spec is as without it.

Activations: `constrain_batch` pins a [batch, ...] activation to the batch axes of the mesh
the step is traced under (the towers' and the LM's block inputs and outputs,
`models.stack.run`). Without it XLA's propagation follows the fsdp-split kernels, splitting
activations on their feature dimension while each device computes the whole global batch
(temporaries and FLOPs per device growing with the mesh; benchmarks/results/scale_cpu.md).

`spec_for` needs only the axis sizes (`mesh.shape`), so an `AbstractMesh` (or any object with
a `shape` mapping) computes the specs of a model at any scale without devices.
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

AXES = ("data", "fsdp", "fsdp_transpose", "model")
BATCH = ("data", "fsdp", "fsdp_transpose")  # the batch dimension is split over these

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
    (r"positional_embedding$", P(None, "fsdp")),
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
              dcn_data: int = -1, fsdp_transpose: int = 1) -> jax.sharding.Mesh:  # fmt: skip
    """A (data, fsdp, fsdp_transpose, model) mesh with Auto axis types; data=-1 takes the
    remaining devices. `fsdp_transpose` (default 1) is a second FSDP axis (module docstring).

    Hosts and slices: `dcn_data` > 1 splits the data axis over that many granules (TPU slices
    when the devices span several, else processes) joined by the slow network, and lays fsdp
    and model out inside each granule (`mesh_utils.create_hybrid_device_mesh`); only the
    gradient all-reduce of data parallelism then crosses the slow links. -1 (the default)
    is the number of TPU slices when there are several, else 1: one granule, the devices in
    `jax.make_mesh`'s order, where the outermost axis (data) changes process first. The log
    says which axes cross processes (`describe`).
    """
    devices = list(jax.devices() if devices is None else devices)
    inner = fsdp * fsdp_transpose * model
    sizes = f"fsdp={fsdp} x " + (f"fsdp_transpose={fsdp_transpose} x " if fsdp_transpose > 1
                                 else "") + f"model={model}"  # fmt: skip
    if data == -1:
        if len(devices) % inner:
            raise ValueError(f"{len(devices)} devices cannot be split into {sizes}")
        data = len(devices) // inner
    if data * inner != len(devices):
        raise ValueError(
            f"mesh data={data} x {sizes} needs {data * inner} devices, have {len(devices)}"
        )
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if dcn_data == -1:
        dcn_data = slices if slices > 1 else 1
    axis_types = (AxisType.Auto,) * len(AXES)
    shape = (data, fsdp, fsdp_transpose, model)
    if dcn_data == 1:
        mesh = jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
    else:
        mesh = jax.sharding.Mesh(hybrid_grid(shape, devices, dcn_data, slices > 1), AXES,
                                 axis_types=axis_types)  # fmt: skip
    if len({d.process_index for d in devices}) > 1:
        logging.info("%s", describe(mesh))
    return mesh


def hybrid_grid(shape: tuple, devices, dcn_data: int, by_slice: bool) -> np.ndarray:
    """The array of devices of mesh `shape` (in `AXES` order) whose data axis spans
    `dcn_data` granules (slices if `by_slice`, else processes), each granule holding
    data/dcn_data x the other axes."""
    data = shape[0]
    granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    if dcn_data != granules or data % dcn_data:
        kind = "TPU slices" if by_slice else "processes"
        raise ValueError(f"mesh.dcn_data={dcn_data} must be the number of {kind} ({granules}) "
                         f"and divide mesh data={data} (mesh.dcn_data=1: a mesh laid out "
                         "without regard to slices or hosts)")  # fmt: skip
    inner, outer = (data // dcn_data, *shape[1:]), (dcn_data,) + (1,) * (len(shape) - 1)
    return mesh_utils.create_hybrid_device_mesh(inner, outer, devices,
                                                process_is_granule=not by_slice)  # fmt: skip


def describe(mesh) -> str:
    """Which axes of `mesh` cross processes (hosts), e.g. "mesh data=2 x fsdp=2 x model=1 on
    2 processes: data crosses processes; fsdp, model stay within one"."""
    processes = np.vectorize(lambda d: d.process_index)(mesh.devices)
    shown = [name for name in mesh.axis_names  # fsdp_transpose only where it is used
             if name != "fsdp_transpose" or mesh.shape[name] > 1]  # fmt: skip
    crossing = [name for axis, name in enumerate(mesh.axis_names)
                if name in shown and (np.diff(processes, axis=axis) != 0).any()]  # fmt: skip
    within = [name for name in shown if name not in crossing]
    shape = " x ".join(f"{name}={mesh.shape[name]}" for name in shown)
    text = (
        f"mesh {shape} on {len(np.unique(processes))} processes: "
        f"{', '.join(crossing) or 'no axis'} cross{'es' * (len(crossing) == 1)} processes"
    )
    if within:
        text += f"; {', '.join(within)} stay{'s' * (len(within) == 1)} within one"
    if "model" in crossing:
        text += " (tensor parallelism over the slow links: keep mesh.model within a host)"
    return text


REPLICATE_MAX_BYTES = 2**20  # leaves up to this size may drop a mesh axis (module docstring)


def _names(entry) -> tuple:
    """The mesh axes of one PartitionSpec entry (None, "fsdp" or ("data", "fsdp"))."""
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _entry(names: list):
    return tuple(names) if len(names) > 1 else names[0] if names else None


def _with_transpose(entry):
    """A rule's entry with `fsdp_transpose` after each `fsdp`."""
    return _entry([n for a in _names(entry)
                   for n in ((a, "fsdp_transpose") if a == "fsdp" else (a,))])  # fmt: skip


def spec_for(path: str, shape: tuple, rules: Rules, mesh, dtype=np.float32) -> P:
    """The first matching rule's spec, each axis that does not divide its dimension dropped
    (small leaves), moved to another dimension (large ones) or an error; module docstring."""
    match = next(((pat, spec) for pat, spec in rules if re.search(pat, path)), None)
    if match is None:
        return P()
    pattern, spec = match
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {pattern!r} -> {spec} has more dims than {path} {shape}")
    sizes = dict(mesh.shape)
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    if sizes.get("fsdp_transpose", 1) > 1:  # a rule's fsdp means both FSDP axes
        entries = tuple(_with_transpose(entry) for entry in entries)
    kept: list[list[str]] = [[] for _ in shape]  # the axes splitting each dimension
    splits = lambda d: int(np.prod([sizes[a] for a in kept[d]]))  # noqa: E731
    lost = []  # (dim, axis) of axes that do not divide their dimension
    for dim, entry in enumerate(entries):
        for axis in _names(entry):
            if shape[dim] % (splits(dim) * sizes[axis]):
                lost.append((dim, axis))
            else:
                kept[dim].append(axis)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize if lost else 0
    for dim, axis in lost:
        if nbytes <= REPLICATE_MAX_BYTES:
            logging.debug("sharding: %s dim %d of size %d not divisible by %s=%d; replicated",
                          path, dim, shape[dim], axis, sizes[axis])  # fmt: skip
            continue
        free = [d for d in range(len(shape)) if splits(d) == 1]  # no axis of size > 1 on it
        targets = [d for d in free if d != dim and shape[d] % sizes[axis] == 0]
        if not targets and axis == "fsdp_transpose" and any("fsdp" in k for k in kept):
            logging.debug("sharding: %s split over fsdp only (fsdp_transpose=%d fits no "
                          "dimension)", path, sizes[axis])  # fmt: skip
            continue
        if not targets:
            widths = [shape[dim] // splits(dim)] + [shape[d] for d in free]
            fits = max(n for n in range(1, sizes[axis] + 1)
                       if sizes[axis] % n == 0 and any(w % n == 0 for w in widths))  # fmt: skip
            hint = (
                f"; or mesh fsdp={fits} x fsdp_transpose={sizes[axis] // fits} (the second "
                "FSDP axis on another dimension)"
                if axis == "fsdp" and fits > 1
                else ""
            )
            raise ValueError(
                f"sharding: {path} {tuple(shape)} {np.dtype(dtype).name} ({nbytes / 2**20:.1f} "
                f"MiB) would be replicated over mesh axis {axis!r} of size {sizes[axis]}: no "
                f"dimension of it that no other axis splits is a multiple of {sizes[axis]} "
                f"(rule {pattern!r} -> {spec}); {axis}={fits} would split it{hint}"
            )
        kept[max(targets, key=lambda d: shape[d])].append(axis)
    # A dimension whose axes all stayed keeps the rule's entry as written.
    dims = [entry if list(_names(entry)) == names else _entry(names)
            for entry, names in zip(entries, kept, strict=True)]  # fmt: skip
    while dims and dims[-1] is None:  # P(None,) and P() mean the same; keep the short form
        dims.pop()
    return P(*dims)


def tree_specs(tree, mesh, rules: Rules = CLIP_RULES):
    """PartitionSpecs for every leaf (arrays or ShapeDtypeStructs) of a params/opt-state tree;
    `mesh` may be abstract (only its axis sizes are read)."""

    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = getattr(leaf, "dtype", np.float32)
        return spec_for(params_lib.key_path_str(path), shape, rules, mesh, dtype)

    return jax.tree_util.tree_map_with_path(one, tree)


def tree_shardings(tree, mesh, rules: Rules = CLIP_RULES):
    """NamedShardings for every leaf (arrays or ShapeDtypeStructs) of a params/opt-state tree."""
    specs = tree_specs(tree, mesh, rules)
    return jax.tree_util.tree_map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
    )


def shard(tree, mesh, rules: Rules = CLIP_RULES):
    """Place a tree on the mesh according to the rules."""
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` with its leading (batch) dimension pinned to the batch axes of the mesh being traced
    under (`jax.sharding.use_abstract_mesh`, as `train.step.jit_step` does), those of them that
    divide it; the other dimensions replicated. Unchanged without such a mesh, with one batch
    shard, or inside `shard_map` (manual axes)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes or not x.ndim:
        return x
    axes = divisible_axes(x.shape[0], BATCH, mesh)
    if axes is None or np.prod([mesh.shape[a] for a in axes]) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))


def divisible_axes(size, axes, mesh):
    """Those of `axes` in `mesh` that split `size` evenly, in order (each joins while the
    product of the kept ones still divides `size`); None for none."""
    kept, parts = [], 1
    for axis in axes:
        if axis in mesh.axis_names and size % (parts * mesh.shape[axis]) == 0:
            kept.append(axis)
            parts *= mesh.shape[axis]
    return tuple(kept) or None


def batch_shards(mesh) -> int:
    """The number of pieces a batch is split into: data x fsdp x fsdp_transpose."""
    return int(np.prod([dict(mesh.shape).get(axis, 1) for axis in BATCH]))


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) dimension split over the batch axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
