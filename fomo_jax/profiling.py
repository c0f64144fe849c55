"""FLOPs and memory of a compiled train step, never run: the measurements behind the
`budget="measured"` compute budget (spec §5.3) and the budget benchmarks.

`profile_method` compiles a continual method's own step (its architecture, trained
parameters, loss and state update) on the model family's abstract model and batch;
`profile_train_step` is full fine-tuning of a model config, the budget's reference; `maf` in
`fomo_jax.budget` turns two profiles into Memory-Adjusted FLOPs.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fomo_jax import params as params_lib
from fomo_jax import sharding
from fomo_jax.families import clip
from fomo_jax.train import step as step_lib


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _model_of(model_config, family) -> nnx.Module:
    """A shape-only model for a config or variant name; a given module is used as it is."""
    from fomo_jax import models

    if isinstance(model_config, nnx.Module):
        return model_config
    if isinstance(model_config, str):
        model_config = models.get_config(model_config)
    return family.abstract_model(model_config)


def _compile(family, graphdef, tx, method, mesh, state, batch, batch_size):
    shardings = step_lib.shardings_of(state, mesh, family.rules)
    jitted = step_lib.compile_step(family, graphdef, tx, method, mesh, shardings)
    start = time.perf_counter()
    compiled = jitted.lower(state, batch, jax.ShapeDtypeStruct((), jnp.float32)).compile()
    compile_seconds = time.perf_counter() - start
    trained, frozen = params_lib.partition(state.params, method.trainable)
    return _report(compiled, mesh, batch_size, compile_seconds, trained, frozen)


def _fresh(method, tx):
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    return lambda params: step_lib.fresh_state(params, method, tx, key)


def profile_train_step(model_config, tx, batch_size: int, *, mesh=None, input_format="images",
                       family=None) -> dict:  # fmt: skip
    """XLA's FLOPs and buffer sizes of one compiled full fine-tuning step; never run.

    `model_config`: a model config, a variant name (built shape-only, so a ViT-B/16 needs no
    weights) or an nnx module; `family` defaults to CLIP, whose batches may carry uint8
    `images` (as the runner feeds) or normalized float `pixels` (`input_format`).

    Returns `flops` (per step over all devices: the per-device count of the partitioned
    program x devices; replicated work such as the optimizer update under pure data
    parallelism is thereby counted once per device), `peak_bytes` = argument + output +
    temp - alias bytes of the per-device buffer assignment (`compiled.memory_analysis()`; an
    estimate made by the compiler, not an allocator measurement; on CPU it is the CPU
    compiler's assignment: 186 GB for ViT-B/16 at batch 512 against the paper's 46.6 GB on
    GPU, so compare Mult only within one backend), their parts and parameter sizes.
    """
    from fomo_jax.continual.methods import Method

    family = family or clip.FAMILY
    model = _model_of(model_config, family)
    graphdef, params = params_lib.split(model)
    method = Method()  # full fine-tuning: every hook the identity, every parameter trained
    state = jax.eval_shape(_fresh(method, tx), _abstract(params))
    batch = family.abstract_batch(model.config, batch_size, input_format)
    return _compile(family, graphdef, tx, method, mesh or sharding.make_mesh(), state, batch,
                    batch_size)  # fmt: skip


def profile_method(method, model_config, tx, batch_size: int, *, mesh=None) -> dict:
    """`profile_train_step` of a continual method's own step (`fomo_jax.train.step`).

    What the method changes is what is compiled: its architecture (adapters), the parameters
    it trains (frozen ones are never differentiated and have no optimizer state), its loss
    (replay and distillation passes, penalties) and its per-step state update. `method` must
    have been `setup` (its context names the family). Work outside the step (e.g. EWC's Fisher
    pass at task ends, `Method.extra_step_flops`) is added to `flops` per step, as in the
    paper's Table 4; `step_flops` and `extra_flops` keep the two parts.
    """
    from fomo_jax import models

    family = method.ctx.family
    if isinstance(model_config, str):
        model_config = models.get_config(model_config)
    plain = _abstract(params_lib.split(family.abstract_model(model_config))[1])
    fresh = _fresh(method, tx)
    state = jax.eval_shape(lambda theta0: fresh(method.init_params(theta0)), plain)
    batch = family.abstract_batch(model_config, batch_size)
    report = _compile(family, method.graphdef, tx, method, mesh or sharding.make_mesh(), state,
                      batch, batch_size)  # fmt: skip
    report["method_state_bytes"] = _bytes(state.method_state)
    if not method.state_in_step and report["peak_bytes"] is not None:
        # A state the step does not touch is no argument of it, but it stays on the device.
        report["peak_bytes"] += report["method_state_bytes"]
    # Work outside the step (EWC's Fisher pass) is charged per step, as the paper does.
    report["step_flops"] = report["flops"]
    report["extra_flops"] = float(method.extra_step_flops(model_config))
    report["flops"] += report["extra_flops"]
    return report


def grad_pass_flops(family, model_config, batch_size: int) -> float:
    """FLOPs of one forward+backward pass of the family's loss of the plain model at
    `batch_size` (e.g. one batch of EWC's Fisher pass), compiled, never run."""
    model = _model_of(model_config, family)
    graphdef, params = params_lib.split(model)
    batch = family.abstract_batch(model.config, batch_size)
    loss_fn = family.loss(graphdef)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    grad = jax.jit(jax.grad(lambda p, b, k: loss_fn(p, b, k)[0]))
    cost = grad.lower(_abstract(params), batch, key).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def _report(compiled, mesh, batch_size, compile_seconds, trainable_params, frozen) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    per_device = float(cost.get("flops", 0.0))
    memory = compiled.memory_analysis()
    parts = {}
    if memory is not None:
        parts = {
            "argument_bytes": int(memory.argument_size_in_bytes),
            "output_bytes": int(memory.output_size_in_bytes),
            "temp_bytes": int(memory.temp_size_in_bytes),
            "alias_bytes": int(memory.alias_size_in_bytes),
        }
    peak = (
        parts["argument_bytes"] + parts["output_bytes"] + parts["temp_bytes"] - parts["alias_bytes"]
        if parts
        else None
    )
    trainable_bytes = _bytes(trainable_params)
    return {
        "flops": per_device * mesh.size,
        "flops_per_device": per_device,
        "peak_bytes": peak,
        **parts,
        "param_bytes": trainable_bytes + _bytes(frozen),
        "trainable_param_bytes": trainable_bytes,
        "batch_size": batch_size,
        "devices": mesh.size,
        "platform": mesh.devices.flat[0].platform,
        "compile_seconds": compile_seconds,
    }
