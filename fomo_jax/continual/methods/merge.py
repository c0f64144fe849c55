"""Weight-averaging and merge-based continual methods (spec §8.1-8.5): the online EMA, ZS-, FT-
and EMA-Merge, offline merge and the double-merge grid, built on `fomo_jax.merging`.

f(·) is the configured merge function applied per parameter group of the model family (CLIP:
the image tower; the text tower with `logit_scale`), always anchored at θ0, so a global TIES
trim is per group as in the reference's per-tower merges. A group may have its own function
(`merge_<group>`, e.g. `merge_image`, `merge_text`), and LiNeS depth scaling can be applied to
any task-vector merge (`lines.enabled`).

Running merges (m_k, u_k, e_k) live in the method state, which checkpoints save. Merges of
all task endpoints (offline merge, the double merge's a_k) read the endpoints from
`<workdir>/task_endpoints/`, written once per task, and merge leaf by leaf through
`merging.streamed` where the function allows, so memory stays bounded for long streams.
"""

from __future__ import annotations

import functools
import os
import shutil

import jax
import numpy as np
from ml_collections import config_dict

from fomo_jax import distributed, merging
from fomo_jax import params as params_lib
from fomo_jax.continual.methods.base import Method, register
from fomo_jax.data.mixture import derive_seed

# Keyword arguments of the merge functions a config may set (unset: the function's default).
MERGE_KWARGS = {
    "weights": tuple, "t": float, "scale": float, "prune_fraction": float,
    "top_prune_fraction": float, "merge": str, "trim": str, "threshold": int,
    "tall_lambda": float, "eps": float,
}  # fmt: skip


def merge_config(name: str | None = "interpolation") -> config_dict.ConfigDict:
    """`name` (a key of `merging.MERGES`) and its keyword arguments, unset by default."""
    c = config_dict.ConfigDict({"name": name if name else config_dict.placeholder(str)})
    for key, kind in MERGE_KWARGS.items():
        c[key] = config_dict.placeholder(kind)
    return c


def lines_config() -> config_dict.ConfigDict:
    return config_dict.ConfigDict({"enabled": False, "alpha": 0.5, "beta": 0.5, "shape": "linear"})


PRUNING = ("ties", "dare_ties", "breadcrumbs")  # take the method's default prune fraction


class Merger:
    """f(·) of spec §8.1 for a method's config: per parameter group of `family`, anchored at
    θ0. A group's `merge_<group>` block, when the method has one and it names a function,
    replaces `merge` for that group."""

    def __init__(self, config, seed: int, *, prune_fraction: float, family):
        self.seed, self.group_of = seed, family.group_of
        self.specs = {}
        for group in family.groups:
            own = config.get(f"merge_{group}")
            spec = own if own is not None and own.name else config.merge
            name = merging.canonical_name(spec.name)
            kwargs = {k: spec[k] for k in MERGE_KWARGS if spec[k] is not None}
            if name in PRUNING:
                kwargs.setdefault("prune_fraction", prune_fraction)
            if config.lines.enabled and name in merging.LINES_MERGES:
                kwargs["lines"] = dict(alpha=config.lines.alpha, beta=config.lines.beta,
                                       shape=config.lines.shape)  # fmt: skip
            self.specs[group] = (name, kwargs)

    def _groups(self, base, purpose, weighting):
        """(group's θ0, selector, name, kwargs, key) per group."""
        for group, (name, kwargs) in self.specs.items():
            select = lambda path, group=group: self.group_of(path) == group  # noqa: E731
            if weighting is not None and name == "interpolation" and "weights" not in kwargs:
                kwargs = dict(kwargs, weighting=weighting)
            key = None
            if name in merging.NEEDS_KEY:
                key = jax.random.key(derive_seed(self.seed, *map(str, purpose), group) % 2**32)
            yield params_lib.partition(base, select)[0], select, name, kwargs, key

    def __call__(self, base, trees, *, purpose=(), weighting=None):
        """The merge of `trees` (full params) anchored at `base`; `purpose` (e.g.
        ("zs_merge", task)) seeds randomized merges; `weighting` is interpolation's (§8.3)."""
        merged = []
        for b, select, name, kwargs, key in self._groups(base, purpose, weighting):
            ts = [params_lib.partition(t, select)[0] for t in trees]
            merged.append(merging.merge(name, b, ts, key=key, **kwargs))
        return params_lib.combine(*merged)

    def streamed(self, base, read, n, *, purpose=(), weighting=None):
        """The merge of n trees read leaf by leaf (`read(i, path)`): streamed where the merge
        function allows it, else loaded whole."""
        merged = []
        for b, _, name, kwargs, key in self._groups(base, purpose, weighting):
            if name in merging.STREAMED:
                merged.append(merging.streamed(name, b, read, n, **kwargs))
                continue
            paths = list(params_lib.flatten(b))
            trees = [params_lib.unflatten({p: np.asarray(read(i, p)) for p in paths})
                     for i in range(n)]  # fmt: skip
            merged.append(merging.merge(name, b, trees, key=key, **kwargs))
        return params_lib.combine(*merged)


class TaskEndpoints:
    """θ_1 … θ_k on disk, one directory of per-leaf .npy files per task
    (`<workdir>/task_endpoints/task_<k>`), written atomically and read back as memmaps."""

    def __init__(self, workdir: str):
        self.directory = os.path.join(workdir, "task_endpoints")

    def path(self, task: int) -> str:
        return os.path.join(self.directory, f"task_{task:04d}")

    def add(self, task: int, params) -> None:
        """Write θ_task (by process 0 of a multi-process run; the others wait for it)."""
        if distributed.primary():
            tmp = self.path(task) + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            merging.save_npy(jax.device_get(params), tmp)
            shutil.rmtree(self.path(task), ignore_errors=True)  # a resumed task rewrites its own
            os.replace(tmp, self.path(task))
        distributed.barrier(f"task endpoint {task}")

    def reader(self, tasks: list[int]):
        """read(i, path) -> the leaf at `path` of the i-th of `tasks`."""
        return merging.npy_reader([self.path(t) for t in tasks])


@register
class OnlineEMA(Method):
    """θ_ema ← d·θ_ema + (1 − d)·θ after every step; evaluated and trained from (spec §8.5)."""

    name = "ema_online"
    defaults = {"decay": 0.999}

    def init_state(self, params):
        return {"ema": params}

    def step_update(self, state, params, info):
        d = self.config.decay
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
        return {"ema": ema}, {}

    def end_of_task(self, task, params, state):
        return state["ema"], state

    def eval_params(self, task, params, state):
        return state["ema"]


class _MergeMethod(Method):
    prune_fraction = 0.7  # TIES-family default of the per-task merge methods (spec §9)
    defaults = {
        "merge": merge_config,
        "merge_image": functools.partial(merge_config, None),
        "merge_text": functools.partial(merge_config, None),
        "lines": lines_config,
    }

    def setup(self, ctx):
        super().setup(ctx)
        self.f = Merger(self.config, ctx.config.seed, prune_fraction=self.prune_fraction,
                        family=ctx.family)  # fmt: skip

    def init_state(self, params):
        return {"theta0": params}


@register
class ZSMerge(_MergeMethod):
    """Every task fine-tunes θ0; m_k = f([θ_k, m_{k−1}]), m_0 = θ0, is evaluated."""

    name = "zs_merge"

    def init_state(self, params):
        return {"theta0": params, "merged": params}

    def train_params(self, task, params, state):
        return state["theta0"]

    def end_of_task(self, task, params, state):
        merged = self.f(state["theta0"], [params, state["merged"]], purpose=(self.name, task))
        return params, dict(state, merged=merged)

    def eval_params(self, task, params, state):
        return state["merged"]


@register
class FTMerge(_MergeMethod):
    """e_k = f([θ_k, θ0]) is evaluated and the next task trains from it."""

    name = "ft_merge"

    def end_of_task(self, task, params, state):
        merged = self.f(state["theta0"], [params, state["theta0"]], purpose=(self.name, task))
        return merged, state


@register
class EMAMerge(_MergeMethod):
    """m_k = f([θ_k, m_{k−1}]), m_0 = θ0, is evaluated and the next task trains from it."""

    name = "ema_merge"

    def init_state(self, params):
        return {"theta0": params, "merged": params}

    def end_of_task(self, task, params, state):
        merged = self.f(state["theta0"], [params, state["merged"]], purpose=(self.name, task))
        return merged, dict(state, merged=merged)

    def eval_params(self, task, params, state):
        return state["merged"]


def _merge_endpoints(method, state, task, *, include_zero_shot, weighting=None):
    """f([θ1 … θ_{task+1}]) (with θ0 first when `include_zero_shot`), streamed from disk."""
    tasks = list(range(task + 1))
    read_task = method.endpoints.reader(tasks)
    theta0 = state["theta0"]
    if include_zero_shot:
        flat0 = params_lib.flatten(jax.device_get(theta0))

        def read(i, path):
            return np.asarray(flat0[path]) if i == 0 else read_task(i - 1, path)
    else:
        read = read_task
    n = len(tasks) + int(include_zero_shot)
    return method.f.streamed(jax.device_get(theta0), read, n, purpose=(method.name, task),
                             weighting=weighting)  # fmt: skip


@register
class OfflineMerge(_MergeMethod):
    """Every task fine-tunes θ0; after task k, f([θ1 … θk]) is evaluated (spec §8.3)."""

    name = "offline_merge"
    prune_fraction = 0.2
    defaults = dict(
        _MergeMethod.defaults,
        include_zero_shot=False,
        weighting=functools.partial(config_dict.placeholder, str),
    )

    def setup(self, ctx):
        super().setup(ctx)
        self.endpoints = TaskEndpoints(ctx.workdir)
        merging.interpolation_weights(2, self.config.weighting)  # a bad name fails here

    def init_state(self, params):
        return {"theta0": params, "merged": params}

    def train_params(self, task, params, state):
        return state["theta0"]

    def end_of_task(self, task, params, state):
        self.endpoints.add(task, params)
        include = bool(self.config.include_zero_shot)
        if task + 1 + int(include) < 2:  # one checkpoint: evaluate it
            merged = params
        else:
            merged = _merge_endpoints(self, state, task, include_zero_shot=include,
                                      weighting=self.config.weighting)  # fmt: skip
        return params, dict(state, merged=merged)

    def eval_params(self, task, params, state):
        return state["merged"]


# The reference's eight init_deploy cells (spec §8.4).
DOUBLE_MERGE_PRESETS = ("all_all", "all_ft", "all_unrolled", "ft_all", "ft_unrolled",
                        "unrolled_all", "unrolled_ft", "zs_unrolled")  # fmt: skip


@register
class DoubleMerge(_MergeMethod):
    """Train task k+1 from X_k, deploy Y_k: X ∈ {zs, ft, unrolled, all}, Y ∈ {ft, unrolled,
    all}; u_1 = θ1, u_j = f([θ_j, u_{j−1}]); a_k = f([θ1 … θk]) uniform (spec §8.4)."""

    name = "double_merge"
    defaults = dict(
        _MergeMethod.defaults,
        preset="all_ft",
        init=functools.partial(config_dict.placeholder, str),  # init and deploy, when set,
        deploy=functools.partial(config_dict.placeholder, str),  # replace the preset
    )
    INITS, DEPLOYS = ("zs", "ft", "unrolled", "all"), ("ft", "unrolled", "all")

    def __init__(self, config=None):
        super().__init__(config)
        if self.config.init or self.config.deploy:
            self.init, self.deploy = self.config.init, self.config.deploy
        elif self.config.preset in DOUBLE_MERGE_PRESETS:
            self.init, self.deploy = self.config.preset.split("_")
        else:
            raise ValueError(f"double_merge preset {self.config.preset!r}; "
                             f"known: {DOUBLE_MERGE_PRESETS}")  # fmt: skip
        if self.init not in self.INITS or self.deploy not in self.DEPLOYS:
            raise ValueError(f"double_merge init={self.init!r} (one of {self.INITS}), "
                             f"deploy={self.deploy!r} (one of {self.DEPLOYS})")  # fmt: skip

    def setup(self, ctx):
        super().setup(ctx)
        self.endpoints = TaskEndpoints(ctx.workdir)

    def init_state(self, params):
        return {"theta0": params, "unrolled": params, "all": params}

    def end_of_task(self, task, params, state):
        purpose = (self.name, task)
        if task == 0:
            unrolled = params
        else:
            unrolled = self.f(state["theta0"], [params, state["unrolled"]], purpose=purpose)
        self.endpoints.add(task, params)
        if task == 0:
            all_merge = params
        else:
            all_merge = _merge_endpoints(self, state, task, include_zero_shot=False)
        return params, dict(state, unrolled=unrolled, all=all_merge)

    @staticmethod
    def _pick(which, params, state):
        return params if which == "ft" else state[{"zs": "theta0"}.get(which, which)]

    def train_params(self, task, params, state):
        return params if task == 0 else self._pick(self.init, params, state)

    def eval_params(self, task, params, state):
        return self._pick(self.deploy, params, state)
