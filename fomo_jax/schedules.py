"""Learning-rate schedules of FoMo-in-Flux (spec/fif.md §7.4-7.5), as host-side functions.

`make(name, base_lr=..., steps_per_task=..., num_tasks=...)` returns `lr(task, step)`: task and
step are 0-based, the step restarts every task, and the value is a Python float computed in
float64. The train step takes the rate as an input, so no schedule ever recompiles it.

Notation (spec): lr0 = base_lr, lr_min = lr0 * min_lr_multiplier, T_s = steps_per_task,
W = ceil(warmup_fraction * T_s), C = ceil(cooldown_fraction * T_s), E = T_s - W. W and C use
exact rational arithmetic (spec §7.5: T_s = 30 gives W = 3, not the 4 of binary floating point).

Names (reference name in brackets): `constant` [none], `cosine` [cosine], `warmup_cosine`
[cosine_with_linear_warmup, the benchmark default], `warmup_cosine_meta`
[cosine_with_linear_warmup_and_recovery], `warmup_cosine_dynamic`
[cosine_with_linear_warmup_and_dynamic_recovery], `multistep`, `rsqrt` [rsqrt], `rsqrt_meta`
[rsqrt_with_recovery; `meta_mode` autoregressive / continued / recovered], and `wsd`
(warmup-stable-decay; listed but never implemented by the reference, so ours is new).

The formulas are plain float64 math rather than optax schedule objects: optax evaluates in
float32 jnp (its warmup also starts at 0, not lr0/W), and the spec's values are host-side
numbers fed to the jitted step, so the exact float64 value is what the step should receive.
For your own optax optimizer, `as_optax(name, base_lr=..., steps_per_task=..., num_tasks=...)`
gives any schedule as an `optax.Schedule` of the global step (the same values, in float32).

Plot one or several schedules over a whole stream:

    python -m fomo_jax.schedules --names warmup_cosine,warmup_cosine_meta,rsqrt_meta \
        --steps_per_task 1420 --num_tasks 20 --out schedules.png
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from fractions import Fraction

Schedule = Callable[[int, int], float]
NAMES = ("constant", "cosine", "warmup_cosine", "warmup_cosine_meta", "warmup_cosine_dynamic",
         "multistep", "rsqrt", "rsqrt_meta", "wsd")  # fmt: skip


def _ceil_fraction(fraction: float, steps: int) -> int:
    """ceil(fraction * steps) on the decimal value the user wrote, not its binary float."""
    return math.ceil(Fraction(repr(float(fraction))) * steps)


def _cosine(progress: float, top: float, floor: float) -> float:
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (top - floor)


class _Params:
    """Schedule parameters; every one must be used by the chosen schedule (no dead flags)."""

    def __init__(self, name: str, params: dict):
        self.name, self.params, self.used = name, dict(params), set()

    def get(self, key, default):
        self.used.add(key)
        return self.params.get(key, default)

    def check(self):
        unused = set(self.params) - self.used
        if unused:
            raise ValueError(f"schedule {self.name!r} does not take {sorted(unused)}")


def make(name: str, *, base_lr: float, steps_per_task: int, num_tasks: int, **params) -> Schedule:
    """The schedule `name` as a function (task, step) -> learning rate (see the module doc)."""
    if steps_per_task < 1 or num_tasks < 1:
        raise ValueError(f"need steps_per_task, num_tasks >= 1, got {steps_per_task}, {num_tasks}")
    p = _Params(name, params)
    lr0, steps = float(base_lr), int(steps_per_task)
    uses_floor = name not in ("constant", "multistep")
    lr_min = lr0 * float(p.get("min_lr_multiplier", 1e-3)) if uses_floor else lr0

    def warmup_steps() -> int:
        fraction, absolute = p.get("warmup_fraction", 0.1), p.get("warmup_steps", None)
        w = int(absolute) if absolute is not None else _ceil_fraction(fraction, steps)
        if not 1 <= w < steps:
            raise ValueError(f"warmup of {w} steps does not fit a {steps}-step task")
        return w

    def cooldown_steps(w: int) -> int:
        c = _ceil_fraction(p.get("cooldown_fraction", 0.1), steps)
        if not 1 <= c <= steps - w:
            raise ValueError(f"cooldown of {c} steps does not fit after a {w}-step warmup")
        return c

    if name == "constant":
        fn = lambda k, s: lr0
    elif name == "cosine":
        fn = lambda k, s: _cosine(s / steps, lr0, lr_min)
    elif name in ("warmup_cosine", "warmup_cosine_meta", "warmup_cosine_dynamic"):
        fn = _warmup_cosine(name, lr0, lr_min, steps, warmup_steps(), p)
    elif name == "multistep":
        batch = int(p.get("batch_size", 512))
        milestones = [int(m) // batch for m in p.get("milestones", (175_000, 225_000))]
        gamma = float(p.get("gamma", 0.1))
        fn = lambda k, s: lr0 * gamma ** sum(s >= m for m in milestones)
    elif name in ("rsqrt", "rsqrt_meta"):
        w = warmup_steps()
        fn = _rsqrt(name, lr0, lr_min, steps, w, cooldown_steps(w), p)
    elif name == "wsd":
        fn = _wsd(lr0, lr_min, steps, warmup_steps(), p)
    else:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(NAMES)}")
    p.check()

    def schedule(task: int, step: int) -> float:
        if not (0 <= task < num_tasks and 0 <= step < steps):
            raise ValueError(f"(task {task}, step {step}) outside {num_tasks} tasks x {steps}")
        return float(fn(int(task), int(step)))

    return schedule


def _warmup_cosine(name, lr0, lr_min, steps, w, p) -> Callable[[int, int], float]:
    """Linear warmup to the task's peak, then cosine to lr_min at the task's last step."""
    e = steps - w

    def peak(k: int) -> float:  # P_k of the cosine meta-schedule; lr0 for the plain schedule
        if name == "warmup_cosine" or k == 0:
            return lr0
        v = 0.5 * (1.0 + math.cos(math.pi * (k * e + 1) / ((k + 1) * e)))
        return lr_min + v * (lr0 - lr_min)

    def fn(k: int, s: int) -> float:
        top = peak(k)
        if s < w:
            return top * (s + 1) / w
        if name == "warmup_cosine_dynamic":
            # The tail of one warmup-cosine stretched over tasks 0..k (its own warmup W').
            horizon, g = (k + 1) * steps, k * steps + s
            w_global = _ceil_fraction(0.1, horizon)
            return _cosine((g - w_global + 1) / (horizon - w_global), lr0, lr_min)
        return _cosine((s - w + 1) / e, top, lr_min)

    return fn


def _rsqrt(name, lr0, lr_min, steps, w, c, p) -> Callable[[int, int], float]:
    """Warmup, inverse-square-root decay, then a linear cooldown to 0 over the last C steps."""
    mode = p.get("meta_mode", "autoregressive") if name == "rsqrt_meta" else None
    compat = p.get("recovered_compat", False) if mode == "recovered" else False
    if mode not in (None, "autoregressive", "continued", "recovered"):
        raise ValueError(f"meta_mode must be autoregressive, continued or recovered, got {mode!r}")
    d = steps - c - w  # the decay phase of one task

    def base(k: int) -> float:
        if mode is None or mode == "recovered" or k == 0:
            return lr0
        if mode == "autoregressive":
            v = math.sqrt((k + 1) * w / (k * steps + w))
        else:  # continued: where one rsqrt decay stood at the end of the previous task
            v = math.sqrt(w / (k * (steps - c) - (k - 1) * w))
        return lr_min + v * (base(0) - lr_min)

    def fn(k: int, s: int) -> float:
        top = base(k)
        if s < w:
            if mode == "recovered" and k > 0:
                # The reference counts the clock offset twice here (spec §7.4); the [FIX]
                # warms up to the value the continued decay has at s = W.
                offset = 2 * k * d if compat else w + k * d
                top = lr_min + math.sqrt(w / offset) * (lr0 - lr_min)
            return top * (s + 1) / w
        clock = s + k * d if mode == "recovered" else s
        value = lr_min + math.sqrt(w / clock) * (top - lr_min)
        if s >= steps - c:
            value *= (c - (s - (steps - c)) - 1) / c
        return value

    return fn


def _wsd(lr0, lr_min, steps, w, p) -> Callable[[int, int], float]:
    """Warmup-stable-decay (new in fomo_jax): warmup, constant lr0, decay to lr_min at the end."""
    decay = _ceil_fraction(p.get("decay_fraction", 0.1), steps)
    shape = p.get("decay_shape", "linear")
    if shape not in ("linear", "1-sqrt"):
        raise ValueError(f"decay_shape must be 'linear' or '1-sqrt', got {shape!r}")
    if not 1 <= decay <= steps - w:
        raise ValueError(f"decay of {decay} steps does not fit after a {w}-step warmup")
    start = steps - decay

    def fn(k: int, s: int) -> float:
        if s < w:
            return lr0 * (s + 1) / w
        if s < start:
            return lr0
        progress = (s - start + 1) / decay
        drop = progress if shape == "linear" else math.sqrt(progress)
        return lr_min + (1.0 - drop) * (lr0 - lr_min)

    return fn


def stream_curve(schedule: Schedule, steps_per_task: int, num_tasks: int) -> list[float]:
    """The learning rate at every step of the stream, task after task."""
    return [schedule(k, s) for k in range(num_tasks) for s in range(steps_per_task)]


def as_optax(
    name_or_schedule: str | Schedule,
    *,
    steps_per_task: int,
    num_tasks: int,
    base_lr: float | None = None,
    dtype=None,
    **params,
):
    """A schedule as an `optax.Schedule` of the global step count t = task x steps_per_task + step.

    `name_or_schedule`: a name of `make` (then `base_lr` and the schedule's parameters are
    required as for `make`) or a schedule `lr(task, step)` already made. The value at t is
    `make(...)(task, step)` rounded once to `dtype` (default float32, what the train step
    receives as its learning-rate input), so a user's optax optimizer sees the same rates as a
    run; counts before the stream give its first rate, counts past it its last (optax's
    convention of holding the end value). Works with a traced count (`jax.jit`, optax's
    `scale_by_schedule`, `inject_hyperparams`).

    The stream's rates are tabulated on the host once and the count indexes the table: the
    float64 formulas above stay the one definition (no float32 re-implementation to drift from
    them), and the table is small (4 bytes a step: 28,400 steps for the paper's stream).
    """
    import jax.numpy as jnp  # here, so plotting and config loading never import JAX
    import numpy as np

    if isinstance(name_or_schedule, str):
        if base_lr is None:
            raise ValueError(f"as_optax({name_or_schedule!r}) needs base_lr")
        schedule = make(name_or_schedule, base_lr=base_lr, steps_per_task=steps_per_task,
                        num_tasks=num_tasks, **params)  # fmt: skip
    elif callable(name_or_schedule):
        if base_lr is not None or params:
            given = sorted(params) + (["base_lr"] if base_lr is not None else [])
            raise ValueError(f"as_optax of a made schedule takes no schedule parameters {given}")
        schedule = name_or_schedule
    else:
        raise TypeError(
            f"as_optax needs a schedule name or lr(task, step), got {name_or_schedule!r}"
        )
    curve = np.asarray(stream_curve(schedule, steps_per_task, num_tasks), np.float64)
    table = jnp.asarray(curve.astype(dtype or np.float32))  # one rounding, to nearest

    def optax_schedule(count):
        index = jnp.clip(jnp.asarray(count).astype(jnp.int32), 0, table.shape[0] - 1)
        return table[index]

    return optax_schedule


def plot(curves: dict[str, list[float]], steps_per_task: int, path: str) -> None:
    """One line per schedule over the stream, task boundaries dotted (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.8))
    for name, values in curves.items():
        ax.plot(values, label=name, lw=1.4)
    num_tasks = len(next(iter(curves.values()))) // steps_per_task
    for k in range(1, num_tasks):
        ax.axvline(k * steps_per_task, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="step over the stream", ylabel="learning rate",
           title=f"{num_tasks} tasks x {steps_per_task} steps")  # fmt: skip
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_variant(text: str) -> tuple[str, dict]:
    """ "rsqrt_meta:meta_mode=continued;recovered_compat=true" -> (name, params); values are
    JSON where they parse (numbers, true/false), strings otherwise."""
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return name, params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Plot learning-rate schedules over a stream.")
    parser.add_argument(
        "--names",
        default="warmup_cosine,warmup_cosine_meta,rsqrt_meta",
        help="comma-separated; NAME:key=value;... adds parameters, e.g. "
        "'rsqrt_meta:meta_mode=continued'. Separate variants with '+'.",
    )
    parser.add_argument("--base_lr", type=float, default=1e-5)
    parser.add_argument("--steps_per_task", type=int, default=1420)
    parser.add_argument("--num_tasks", type=int, default=20)
    parser.add_argument("--out", default="schedules.png")
    args = parser.parse_args(argv)
    curves = {}
    for label in args.names.split(","):
        name, params = parse_variant(label)
        schedule = make(name, base_lr=args.base_lr, steps_per_task=args.steps_per_task,
                        num_tasks=args.num_tasks, **params)  # fmt: skip
        curves[label] = stream_curve(schedule, args.steps_per_task, args.num_tasks)
    plot(curves, args.steps_per_task, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
