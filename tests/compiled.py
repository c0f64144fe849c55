"""Calling an NNX module as one compiled program.

An eager call of a Flax NNX module dispatches every primitive on its own, and on an empty
compilation cache each new shape of each primitive compiles its own small XLA program: a
forward of the tiny VLM compiles about two hundred of them (10-15 s on a 2-core CI machine),
where one jitted forward compiles once and then comes from the persistent cache."""

import jax
from flax import nnx


def call(module, *args, method: str = "__call__", **kwargs):
    """`getattr(module, method)(*args, **kwargs)`, traced and compiled as one program."""
    graphdef, state = nnx.split(module)

    def run(state, args, kwargs):
        return getattr(nnx.merge(graphdef, state), method)(*args, **kwargs)

    return jax.jit(run)(state, args, kwargs)
