"""The same experiment under several learning-rate schedules or continual methods, compared
in one table and figure.

    fomo-jax sweep --workdir=runs/schedule_sweep
    fomo-jax sweep --config=fif_synth:smoke --workdir=/tmp/sweep \
        --schedules=warmup_cosine,rsqrt_meta:meta_mode=continued
    fomo-jax sweep --workdir=runs/method_sweep --methods=all
    fomo-jax sweep --methods=finetune,lora:rank=64,zs_merge:merge.name=ties
    fomo-jax sweep --methods=all --workdir=runs/method_sweep_equal_compute \
        --config.equal_compute=True --config.budget=measured

(`python -m fomo_jax.continual.sweep ...` is the same command.)

Each variant runs in `<workdir>/<variant>/` through the continual runner (so an interrupted
sweep resumes, and finished runs are reused); everything else in the config is shared. A
method variant is NAME:key=value;... over `config.methods.NAME` (dotted keys reach nested
blocks). With `--config.equal_compute=True` each method gets full fine-tuning's steps x
MAF_finetune / MAF_method (equal compute) instead of equal steps. Writes `comparison.json`,
`comparison.md` (steps per task, final and area-under-trajectory A_KA / A_ZS / GM),
`trajectories.png` (A_ZS against A_KA for every variant) and, for schedules, `schedules.png`.
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import flags, logging
from ml_collections import config_dict

from fomo_jax import schedules

# Every schedule with its defaults, plus the other two rsqrt meta modes.
SCHEDULES = schedules.NAMES + ("rsqrt_meta:meta_mode=continued", "rsqrt_meta:meta_mode=recovered")
KEYS = ("knowledge_accumulation", "zero_shot_retention", "geometric_mean")
# The reference's multistep milestones (175,000 and 225,000 samples of a 727,040-sample task)
# as fractions of a task, so that a shorter synthetic task keeps their place.
MULTISTEP_FRACTIONS = (175_000 / 727_040, 225_000 / 727_040)


def schedule_config(variant: str, config) -> config_dict.ConfigDict:
    """The `config.schedule` block of a variant ("name:key=value;...") with spec defaults."""
    name, params = schedules.parse_variant(variant)
    if name == "multistep" and "milestones" not in params:
        samples = config.steps_per_task * config.batch_size
        params["milestones"] = [round(f * samples) for f in MULTISTEP_FRACTIONS]
    return config_dict.ConfigDict({"name": name, **params})


def method_config(variant: str, config) -> None:
    """Set `config.method` and its hyperparameters from "name:key=value;..." (in place)."""
    name, params = schedules.parse_variant(variant)
    if name not in config.methods:
        raise ValueError(f"unknown method {name!r} in sweep variant {variant!r}")
    config.method = name
    for key, value in params.items():
        set_dotted(config.methods[name], key, value)


def set_dotted(node, key: str, value) -> None:
    """`node.a.b.c = value` for key "a.b.c" (in place)."""
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value


def all_methods() -> list[str]:
    from fomo_jax.continual import methods

    return sorted(methods.default_configs())


def run_sweep(config, workdir: str, variants=SCHEDULES, *, axis: str = "schedule") -> dict:
    from fomo_jax.continual import runner

    os.makedirs(workdir, exist_ok=True)
    rows, curves = {}, {}
    for variant in variants:
        run_config = config_dict.ConfigDict(config.to_dict())
        if axis == "schedule":
            run_config.schedule = schedule_config(variant, run_config)
        else:
            method_config(variant, run_config)
        folder = os.path.join(workdir, re.sub(r"[^A-Za-z0-9_.=-]+", "_", variant))
        logging.info("sweep: %s -> %s", variant, folder)
        results = runner.run(run_config, folder)
        rows[variant] = dict(
            final={k: results["final"][k] for k in KEYS},
            area_under_trajectory=results["area_under_trajectory"],
            trajectory=[{k: p[k] for k in KEYS} for p in results["trajectory"]],
            steps_per_task=results["steps_per_task"],
        )
        steps = results["steps_per_task"]
        lr = runner.schedule_of(run_config, steps)
        curves[variant] = schedules.stream_curve(lr, steps, run_config.num_tasks)
    with open(os.path.join(workdir, "comparison.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(workdir, "comparison.md"), "w") as f:
        f.write(format_comparison(rows, axis))
    if axis == "schedule":
        schedules.plot(curves, steps, os.path.join(workdir, "schedules.png"))
    from fomo_jax.continual import compare

    compare.plot_trajectories(
        rows, os.path.join(workdir, "trajectories.png"), title=f"{axis.capitalize()}s"
    )
    print(format_comparison(rows, axis))
    return rows


def format_comparison(rows: dict, axis: str = "schedule") -> str:
    lines = [
        f"| {axis} | steps/task | final A_KA | final A_ZS | final GM | AUT A_KA | AUT A_ZS "
        "| AUT GM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in rows.items():
        final = [f"{row['final'][k]:.2f}" for k in KEYS]
        area = [f"{row['area_under_trajectory'][k]:.2f}" for k in KEYS]
        cells = [variant, str(row["steps_per_task"])] + final + area
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("AUT: area under the trajectory (zero-shot point, then one point per task), "
                 "normalized by the number of intervals.")  # fmt: skip
    return "\n".join(lines) + "\n"


def define_flags(flag_values: flags.FlagValues) -> dict[str, flags.FlagHolder]:
    """The sweep's flags (`fomo-jax sweep` adds --config), on the command's own FlagValues."""
    return dict(
        workdir=flags.DEFINE_string(
            "workdir", "runs/schedule_sweep", "Where the runs go.", flag_values=flag_values
        ),
        schedules=flags.DEFINE_list(
            "schedules", list(SCHEDULES), "Schedule variants to compare.", flag_values=flag_values
        ),
        methods=flags.DEFINE_list(
            "methods",
            [],
            "Method variants to compare instead of schedules ('all': every method).",
            flag_values=flag_values,
        ),
    )


def main(config, workdir: str, schedule_variants: list[str], method_variants: list[str]) -> dict:
    """Run the sweep the flags describe: over methods when any are named, else schedules."""
    from fomo_jax import runtime

    runtime.quiet_checkpoint_logs()
    runtime.enable_compilation_cache()
    if method_variants:
        variants = all_methods() if method_variants == ["all"] else method_variants
        return run_sweep(config, workdir, variants, axis="method")
    return run_sweep(config, workdir, schedule_variants)


if __name__ == "__main__":  # the same as `fomo-jax sweep ...`
    from fomo_jax import cli

    sys.exit(cli.main([sys.argv[0], "sweep", *sys.argv[1:]]))
