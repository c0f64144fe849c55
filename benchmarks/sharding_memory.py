"""Parameter bytes per device of the CLIP variants on 256-device meshes, by the sharding rules.

Computed from shapes alone (abstract models, `jax.sharding.AbstractMesh`): no device is used.
For each variant and mesh: the float32 parameters' total, one device's share under
`sharding.CLIP_RULES` as they are now, and under the old rule (an axis that does not divide a
dimension dropped, whatever the leaf's size: the same code with an unbounded
`REPLICATE_MAX_BYTES`), against the ideal total / (fsdp x model). Optimizer moments (Adam's two)
are sharded like their parameter, so they scale the same way. "error" is the new rule refusing
to replicate a large leaf (its message names the first one).

    python benchmarks/sharding_memory.py  # a few seconds on the 2-core dev machine
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import unittest.mock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
from jax.sharding import AbstractMesh  # noqa: E402

from fomo_jax import models, sharding  # noqa: E402
from fomo_jax import params as params_lib  # noqa: E402
from fomo_jax.models.clip import abstract_clip  # noqa: E402

VARIANTS = ["ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-bigG-14"]
# (data, fsdp, fsdp_transpose, model)
MESHES = [(1, 256, 1, 1), (2, 128, 1, 1), (1, 128, 1, 2), (1, 64, 1, 4), (1, 128, 2, 1)]


def per_device_bytes(flat: dict, mesh) -> int:
    """One device's bytes of `flat`'s leaves under CLIP_RULES on `mesh`."""
    sizes = dict(mesh.shape)
    total = 0
    for path, leaf in flat.items():
        spec = sharding.spec_for(path, leaf.shape, sharding.CLIP_RULES, mesh, leaf.dtype)
        parts = np.prod([sizes[a] for entry in spec for a in sharding._names(entry)])
        total += leaf.size * leaf.dtype.itemsize // int(parts)
    return total


def main():
    rows = []
    for name in VARIANTS:
        flat = params_lib.flatten(params_lib.split(abstract_clip(models.get_config(name)))[1])
        total = sum(leaf.size * leaf.dtype.itemsize for leaf in flat.values())
        for axes in MESHES:
            mesh = AbstractMesh(axes, sharding.AXES)
            with unittest.mock.patch.object(sharding, "REPLICATE_MAX_BYTES", float("inf")):
                old = per_device_bytes(flat, mesh)
            try:
                new, error = per_device_bytes(flat, mesh), None
            except ValueError as e:
                new, error = None, str(e)
            rows.append(dict(variant=name, mesh=dict(zip(sharding.AXES, axes, strict=True)),
                             total_bytes=total, ideal_bytes=total // int(np.prod(axes[1:])),
                             old_rule_bytes=old, new_rule_bytes=new, error=error))  # fmt: skip
    record = dict(
        command="python benchmarks/sharding_memory.py",
        date=datetime.date.today().isoformat(),
        hardware=f"{platform.machine()}, {os.cpu_count()} CPUs (no device used: shapes only)",
        rows=rows,
    )
    out = os.path.join(REPO, "benchmarks", "results", "sharding_memory")
    with open(out + ".json", "w") as f:
        json.dump(record, f, indent=1)
    mib = lambda b: "-" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    lines = [
        f"# Parameter bytes per device on 256 devices ({record['date']}, shapes only)",
        "",
        f"`{record['command']}`: float32 CLIP parameters, one device's share under "
        "`sharding.CLIP_RULES`; old rule = a non-dividing axis dropped whatever the leaf's size "
        "(before issue 21), new = moved to another dimension or an error for leaves > 1 MiB "
        "(`fsdp_transpose`: a second FSDP axis; a rule's fsdp means both).",
        "",
        "| variant | mesh (data x fsdp x fsdp_t x model) | total (MiB) | ideal (MiB) "
        "| old rule (MiB) | new rule (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        mesh = " x ".join(str(v) for v in r["mesh"].values())
        new = mib(r["new_rule_bytes"]) if r["error"] is None else "error: " + r["error"][:60]
        lines.append(f"| {r['variant']} | {mesh} | {mib(r['total_bytes'])} | "
                     f"{mib(r['ideal_bytes'])} | {mib(r['old_rule_bytes'])} | {new} |")  # fmt: skip
    errors = sorted({r["error"] for r in rows if r["error"]})
    if errors:
        lines += ["", "Errors (the first leaf each meets):", ""] + [f"- {e}" for e in errors]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
