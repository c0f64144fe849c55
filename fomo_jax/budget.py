"""Compute budgets: Memory-Adjusted FLOPs (MAF) and steps per task (spec/fif.md §5, §4.3).

The benchmark fixes one budget for the whole stream: 28,400 steps of full fine-tuning of a
ViT-B/16 at batch 512, weighted by MAF = GFLOPs/step x (peak memory / peak memory of full
fine-tuning). A method that is cheaper per step gets more steps per task.

Two sources of step counts:

* `budget="paper"` (the benchmark): Table 4 of the paper, copied below as printed. Its counts
  are the budget definition for ViT-B/16; they are *not* re-derived, because FLOP counters and
  allocators differ between frameworks and the table's own rounding departs from the formula
  by up to 3 steps (spec §5.2 reading notes).
* `budget="measured"`: T_s = floor((28,400 / T) x MAF_full / MAF_m) from MAFs measured with
  `fomo_jax.profiling.profile_method` (a method's own compiled step) + `maf`, for new methods
  and other model sizes.

This module is the arithmetic only (Table 4, steps per task, the tables a run logs); compiling
steps to measure them is `fomo_jax.profiling`.

Method keys are strings; the rank variants are `"lora_r4"`, `"lora_r64"`, `"dora_r4"`, ...
(`method_key("lora", 4)` builds them, and every function taking a method also takes
`rank=`), so a key is a plain, loggable, config-friendly name.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction

from fomo_jax.schedules import _ceil_fraction

FULL_FT_STEPS = 28_400  # full fine-tuning, ViT-B/16, T = 20 x 1420 steps: the stream budget
PAPER_BATCH_SIZE = 512
PAPER_HORIZONS = (20, 50, 100, 200)
RANKED_METHODS = ("lora", "dora", "vera")  # methods whose Table 4 rows exist per rank
PAPER_RANKS = (4, 64)


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of Table 4 (ViT-B/16, batch 512), values exactly as printed."""

    method: str
    label: str  # the paper's name
    gflops: float  # per training step
    memory_gb: float  # peak device memory
    mult: float  # memory / memory of full fine-tuning (the paper's rounding)
    maf: float  # gflops x mult
    steps: dict[int, int]  # T -> steps per task
    total_steps: int  # = steps[200] x 200, as printed


def _row(method, label, gflops, memory, mult, maf, s20, s50, s100, s200, total):
    steps = dict(zip(PAPER_HORIZONS, (s20, s50, s100, s200), strict=True))
    return PaperRow(method, label, gflops, memory, mult, maf, steps, total)


# fmt: off
PAPER_TABLE: dict[str, PaperRow] = {r.method: r for r in (
    _row("finetune", "full-ft", 63394.7585, 46.5917, 1, 63394.7585, 1420, 568, 284, 142, 28_400),
    _row("locked_text", "locked-text", 57254.6183, 37.5761, 0.8064, 46170.1241,
         1949, 780, 390, 195, 39_000),
    _row("locked_image", "locked-image", 27176.6698, 11.8847, 0.2551, 6932.7684,
         12982, 5193, 2596, 1298, 259_600),
    _row("lnfit", "LNFit", 43165.5968, 30.5566, 0.6558, 28307.9983, 3179, 1272, 636, 318, 63_600),
    _row("bitfit", "BitFit", 43165.5968, 30.5546, 0.6558, 28307.9983, 3179, 1272, 636, 318, 63_600),
    _row("lora_r4", "LoRA, r=4", 54479.2515, 40.5449, 0.8702, 47407.8446,
         1898, 759, 380, 190, 38_000),
    _row("lora_r64", "LoRA, r=64", 54505.0151, 40.6757, 0.873, 47582.8781,
         1891, 757, 378, 189, 37_800),
    _row("dora_r4", "DoRA, r=4", 54479.8241, 40.6582, 0.8726, 47539.0945,
         1893, 757, 379, 189, 37_800),
    _row("dora_r64", "DoRA, r=64", 54514.1754, 40.7871, 0.8754, 47721.7091,
         1886, 754, 377, 189, 37_800),
    _row("vera_r4", "VeRA, r=4", 54479.3393, 40.5449, 0.8702, 47407.921,
         1898, 759, 380, 190, 38_000),
    _row("vera_r64", "VeRA, r=64", 54507.8336, 40.5742, 0.8708, 47465.4214,
         1896, 758, 379, 190, 38_000),
    _row("ewc", "EWC", 6276081.094, 47.207, 1.0132, 6358925.364, 14, 6, 3, 1, 200),
    _row("si", "SI", 63394.7585, 46.6523, 1.0013, 63477.1716, 1418, 567, 284, 142, 28_400),
    _row("zs_merge", "ZS-Merge", 63394.7585, 46.5917, 1, 63394.7585, 1420, 568, 284, 142, 28_400),
    _row("ft_merge", "FT-Merge", 63394.7585, 46.5917, 1, 63394.7585, 1420, 568, 284, 142, 28_400),
    _row("ema_merge", "EMA-Merge", 63394.7585, 46.5917, 1, 63394.7585,
         1420, 568, 284, 142, 28_400),
)}
# fmt: on


def method_key(method: str, rank: int | None = None) -> str:
    """The table key: `method_key("lora", 4) == "lora_r4"`; `rank` only for LoRA/DoRA/VeRA."""
    if rank is None:
        if method in RANKED_METHODS:
            raise ValueError(f"{method!r} needs a rank (Table 4 has r={PAPER_RANKS})")
        return method
    if method not in RANKED_METHODS:
        raise ValueError(f"rank={rank} given for {method!r}, which has no rank")
    return f"{method}_r{int(rank)}"


def budget_steps(num_tasks: int, maf_method: float, maf_full: float, *, full_steps=FULL_FT_STEPS):
    """floor((full_steps / T) x MAF_full / MAF_m), on the decimal values (no float rounding).

    Exact rationals keep the boundary cases right: a method with MAF_m = MAF_full gets exactly
    full_steps / T steps, not one fewer.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks={num_tasks} must be >= 1")
    if not (maf_method > 0 and maf_full > 0):
        raise ValueError(f"MAFs must be positive, got method {maf_method}, full {maf_full}")
    exact = Fraction(full_steps, num_tasks) * _decimal(maf_full) / _decimal(maf_method)
    steps = math.floor(exact)
    if steps < 1:
        raise ValueError(f"budget leaves {float(exact):.3f} < 1 steps per task at T={num_tasks}")
    return steps


def _decimal(x) -> Fraction:
    return Fraction(repr(float(x)))


def steps_per_task(
    method: str,
    num_tasks: int,
    *,
    budget: str = "paper",
    rank: int | None = None,
    measured_maf: float | None = None,
    full_maf: float | None = None,
) -> int:
    """Steps per task T_s for `method` over a stream of `num_tasks` tasks.

    "paper": Table 4's count for (method, T) when T is one of its horizons (20, 50, 100, 200);
    for another T, the budget formula on the table's MAFs (the paper's definition; no count
    was published). "measured": the formula on `measured_maf` and `full_maf` (both from
    `maf`), for any method name.
    """
    if budget == "measured":
        if measured_maf is None or full_maf is None:
            raise ValueError('budget="measured" needs measured_maf and full_maf (see maf())')
        return budget_steps(num_tasks, measured_maf, full_maf)
    if budget != "paper":
        raise ValueError(f"budget={budget!r}; expected 'paper' or 'measured'")
    if measured_maf is not None or full_maf is not None:
        raise ValueError('measured_maf/full_maf are only used with budget="measured"')
    row = paper_row(method, rank)
    if num_tasks in row.steps:
        return row.steps[num_tasks]
    return budget_steps(num_tasks, row.maf, PAPER_TABLE["finetune"].maf)


def paper_row(method: str, rank: int | None = None) -> PaperRow:
    """Table 4's row; unknown methods/ranks fail with a pointer to the measured budget."""
    key = method_key(method, rank) if rank is not None or method in RANKED_METHODS else method
    if key not in PAPER_TABLE:
        raise KeyError(
            f"{key!r} is not in Table 4 (known: {', '.join(PAPER_TABLE)}); profile it with "
            'profile_method and use budget="measured"'
        )
    return PAPER_TABLE[key]


def n_samples(steps: int, batch_size: int = PAPER_BATCH_SIZE) -> int:
    """Samples per task summed over all pools (spec §4.3: n_samples = T_s x B)."""
    return int(steps) * int(batch_size)


def warmup_steps(steps: int, fraction: float = 0.1) -> int:
    """ceil(fraction x steps) on the decimal fraction: 30 -> 3 (float 0.1 x 30 would give 4)."""
    return _ceil_fraction(fraction, steps)


# --------------------------------------------------------------------------- MAF and tables


def maf(profile: dict, full_profile: dict) -> dict:
    """GFLOPs/step, peak memory (GB = 1e9 bytes), Mult and MAF of `profile` against full FT.

    Mult is left unrounded (the paper printed 4 decimals); memory units cancel in Mult.
    Both profiles must come from the same model, batch size and device kind.
    """
    for p in (profile, full_profile):
        if not p.get("peak_bytes"):
            raise ValueError("profile has no peak_bytes (the backend gave no memory analysis)")
    gflops = profile["flops"] / 1e9
    mult = profile["peak_bytes"] / full_profile["peak_bytes"]
    return {
        "gflops": gflops,
        "memory_gb": profile["peak_bytes"] / 1e9,
        "mult": mult,
        "maf": gflops * mult,
    }


def task_budget(
    method: str,
    num_tasks: int,
    *,
    batch_size: int = PAPER_BATCH_SIZE,
    warmup_fraction: float = 0.1,
    budget: str = "paper",
    rank: int | None = None,
    measured_maf: float | None = None,
    full_maf: float | None = None,
) -> dict:
    """What a run logs at its start (spec §5.3): T_s, n_samples, W, the MAFs and their source."""
    steps = steps_per_task(
        method,
        num_tasks,
        budget=budget,
        rank=rank,
        measured_maf=measured_maf,
        full_maf=full_maf,
    )
    if budget == "paper":
        row = paper_row(method, rank)
        measured_maf, full_maf = row.maf, PAPER_TABLE["finetune"].maf
        source = "Table 4" if num_tasks in row.steps else "formula on Table 4 MAFs"
        maf_source = "Table 4"
    else:
        source, maf_source = "formula on measured MAFs", "measured"
    return {
        "method": method_key(method, rank) if rank is not None else method,
        "num_tasks": num_tasks,
        "steps_per_task": steps,
        "total_steps": steps * num_tasks,
        "n_samples": n_samples(steps, batch_size),
        "warmup_steps": warmup_steps(steps, warmup_fraction),
        "maf": measured_maf,
        "full_maf": full_maf,
        "maf_source": maf_source,
        "source": source,
    }


def budget_table(
    num_tasks: Sequence[int] = PAPER_HORIZONS,
    *,
    methods: Sequence[str] | None = None,
    profiles: dict[str, dict] | None = None,
    full: str = "finetune",
) -> list[dict]:
    """Rows (method, gflops, memory_gb, mult, maf, steps {T: T_s}, source).

    Without `profiles`: Table 4 (default all its methods). With `profiles` ({method: profile
    from profile_method or profile_train_step}, including `full`): the measured MAFs and
    formula step counts.
    """
    rows = []
    if profiles is None:
        for name in methods or PAPER_TABLE:
            row = paper_row(name)
            steps = {t: steps_per_task(name, t) for t in num_tasks}
            rows.append(
                {
                    "method": row.method,
                    "gflops": row.gflops,
                    "memory_gb": row.memory_gb,
                    "mult": row.mult,
                    "maf": row.maf,
                    "steps": steps,
                    "source": "paper",
                }
            )
        return rows
    if full not in profiles:
        raise KeyError(f"profiles need the reference {full!r} (the full fine-tuning step)")
    full_maf = maf(profiles[full], profiles[full])["maf"]
    for name in methods or profiles:
        m = maf(profiles[name], profiles[full])
        steps = {
            t: steps_per_task(name, t, budget="measured", measured_maf=m["maf"], full_maf=full_maf)
            for t in num_tasks
        }
        rows.append({"method": name, **m, "steps": steps, "source": "measured"})
    return rows


def format_budget_table(rows: Sequence[dict]) -> str:
    """A plain-text table of `budget_table` rows for the start of a run's log."""
    horizons = sorted({t for r in rows for t in r["steps"]})
    header = ["method", "GFLOPs/step", "mem (GB)", "Mult", "MAF"] + [f"T={t}" for t in horizons]
    body = [
        [
            r["method"],
            f"{r['gflops']:.4f}",
            f"{r['memory_gb']:.4f}",
            f"{r['mult']:.4f}",
            f"{r['maf']:.4f}",
            *(str(r["steps"].get(t, "-")) for t in horizons),
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line):
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    sources = sorted({r["source"] for r in rows})
    rule = "-" * len(fmt(header))
    footer = f"steps per task; source: {', '.join(sources)}"
    return "\n".join([fmt(header), rule, *map(fmt, body), rule, footer])


# ------------------------------------------------------------------ a run's start-up report

PAPER_MODEL = "ViT-B-16"  # the model of Table 4


def shows_paper_table(budget_info: dict, *, budget: str, model: str) -> bool:
    """Whether a run's log shows Table 4: when the run's steps or MAFs come from it
    (`budget_info["maf_source"] == "Table 4"`), or it runs the paper's budget on the paper's
    model, ViT-B/16 (`budget == "paper"`, any activation). Elsewhere the table describes
    another model and other steps, and would mislead."""
    paper_model = model.removesuffix("-quickgelu") == PAPER_MODEL
    return budget_info.get("maf_source") == "Table 4" or (budget == "paper" and paper_model)


def format_run_budget(budget_info: dict, *, model: str) -> str:
    """The run's own compute budget (a `task_budget`-style dict) as a two-column table."""
    steps, tasks = budget_info["steps_per_task"], budget_info["num_tasks"]
    per_task = budget_info["n_samples"]
    if budget_info.get("maf") is None:
        maf = "not used (the steps are given)"
    else:
        ratio = budget_info["maf"] / budget_info["full_maf"]
        origin = {"Table 4": "Table 4", "measured": "measured from the compiled steps"}
        maf = (
            f"{budget_info['maf']:.4f} = {ratio:.4f} x full fine-tuning's "
            f"({origin.get(budget_info.get('maf_source'), 'given')})"
        )
    rows = [
        ("model", model),
        ("method", budget_info["method"]),
        ("tasks", str(tasks)),
        ("steps per task", f"{steps} ({budget_info['source']})"),
        ("total steps", str(budget_info["total_steps"])),
        ("batch size", str(per_task // steps)),
        ("samples", f"{per_task} per task, {per_task * tasks} in all"),
        ("MAF", maf),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"  {key.ljust(width)}  {value}" for key, value in rows)


def startup_report(budget_info: dict, *, model: str, budget: str) -> str:
    """What a run logs about its compute at its start: its own budget, then Table 4 at its
    number of tasks when `shows_paper_table`."""
    text = "compute budget of this run (spec §5):\n" + format_run_budget(budget_info, model=model)
    if shows_paper_table(budget_info, budget=budget, model=model):
        table = format_budget_table(budget_table((budget_info["num_tasks"],)))
        text += f"\nthe paper's methods on {PAPER_MODEL} at batch {PAPER_BATCH_SIZE} (Table 4):\n"
        text += table
    return text
