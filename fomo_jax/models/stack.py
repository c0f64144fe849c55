"""Running a stack of transformer blocks: a Python loop, rematerialised, or one `lax.scan`.

Two memory/compile levers of the model configs (`CLIPConfig.remat`, `CLIPConfig.scan` and the
same fields of `LlamaConfig`):

- `remat`: what the backward pass keeps of each block's forward. "none" keeps everything (the
  plain loop; the default). "full" keeps only each block's input and recomputes the block in
  the backward pass (`jax.checkpoint`). "save_matmuls" keeps the outputs of the matmuls with no
  batch dimension, i.e. the linears' outputs (`jax.checkpoint_policies.
  dots_with_no_batch_dims_saveable`), and recomputes the rest (norms, activations, attention
  scores and softmax, whose [B, H, T, T] logits are a batched dot and the largest activation).
- `scan`: the blocks run as one `jax.lax.scan` over their stacked weights, so the traced and
  compiled program holds one block whatever the depth (compile time flat in depth). The
  parameters keep one leaf per block (`.../resblocks/{i}/...`): the stacking happens inside the
  call, from the blocks' own Variables, so checkpoints, merges, LiNeS, adapters, sharding rules
  and export see the same tree as without scan; the gradient of the stack is the per-block
  gradient.

What they buy (benchmarks/remat_scan.py, CPU, CLIP depth 16): remat pays with scan (7.1x less
compiled temporary memory for "full", 2.7x for "save_matmuls"); unrolled, the recomputation is
placed by XLA's scheduler, and the CPU's saves nothing. Scan keeps lowering time and program
size flat in depth, but costs a stacked copy of the blocks' parameters and gradients.

Blocks are pure functions of their parameters: scan and remat split each block into its
graphdef and state and call `nnx.merge(graphdef, state)`, so a block whose call would update
state (dropout RNG counters, batch statistics) is refused rather than silently not updated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from fomo_jax import sharding

REMAT = ("none", "full", "save_matmuls")
# The config fields of the levers and their defaults (left out of config reprs, which key caches).
OPTIONS = {"remat": "none", "scan": False}
# What each remat mode saves for the backward pass (None: nothing, every block recomputed).
POLICIES = {"full": None, "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def check_options(remat, scan) -> None:
    """A clear error for a bad `remat` / `scan` value of a model config."""
    if remat not in REMAT:
        raise ValueError(f"remat={remat!r}; expected one of {REMAT}")
    if not isinstance(scan, bool):
        raise ValueError(f"scan={scan!r}; expected True or False")


def run(
    blocks: Sequence[nnx.Module],
    x: jax.Array,
    call: Callable[[nnx.Module, jax.Array], jax.Array],
    *,
    remat: str = "none",
    scan: bool = False,
    collect: bool = False,
):
    """`x` through `call(block, x)` for each block in order.

    Returns the last output, or with `collect` the list [x, after block 0, ..., after the last
    block]. `call` may close over arrays (masks, positions) but must not update the blocks.
    Each block's input and output keep the batch sharding of the mesh traced under
    (`sharding.constrain_batch`; nothing without one).
    """
    check_options(remat, scan)
    blocks = list(blocks)
    pin = sharding.constrain_batch
    x = pin(x)
    if remat == "none" and not scan:  # the plain loop (the default)
        states = [x]
        for block in blocks:
            x = pin(call(block, x))
            states.append(x)
        return states if collect else x
    if not blocks:
        return [x] if collect else x
    graphdefs, states = _split(blocks, same_structure=scan)

    def apply(graphdef, state, x):
        return pin(call(nnx.merge(graphdef, state), x))

    if remat != "none":
        apply = jax.checkpoint(
            apply, policy=POLICIES[remat], prevent_cse=not scan, static_argnums=(0,)
        )
    if not scan:
        outputs = [x]
        for graphdef, state in zip(graphdefs, states, strict=True):
            outputs.append(apply(graphdef, state, outputs[-1]))
        return outputs if collect else outputs[-1]

    def body(h, state):
        y = apply(graphdefs[0], state, h)
        return y, (y if collect else None)

    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    out, ys = jax.lax.scan(body, x, stacked)
    return [x, *(ys[i] for i in range(len(blocks)))] if collect else out


def _split(blocks, same_structure: bool):
    """([graphdef of each block], [state of each block]); checks what scan and remat rely
    on."""
    graphdefs, states = [], []
    for i, block in enumerate(blocks):
        block_graphdef, state = nnx.split(block)
        for path, variable in nnx.to_flat_state(state):
            if not isinstance(variable, nnx.Param):
                raise ValueError(
                    f"block {i} holds {type(variable).__name__} state at "
                    f"{'/'.join(map(str, path))}: remat and scan need blocks whose only state "
                    "is parameters (no dropout RNGs or batch statistics)"
                )
        if same_structure and graphdefs and block_graphdef != graphdefs[0]:
            raise ValueError(
                f"scan: block {i} differs in structure from block 0 (e.g. an adapter on some "
                "blocks only); scan needs identical blocks, use scan=False"
            )
        graphdefs.append(block_graphdef)
        states.append(state)
    return graphdefs, states
