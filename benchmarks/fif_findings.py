"""The paper's six findings on fif_synth, each checked against a criterion written down before
any run.

    python benchmarks/fif_findings.py --out benchmarks/results/fif_findings_cpu
    python benchmarks/fif_findings.py --findings 1,4 --seeds 3     # a bigger machine
    python benchmarks/fif_findings.py --smoke --workdir /tmp/findings --out /tmp/findings/table

The study is `configs/fif_synth.py:study`: the paper's horizon of 20 tasks (the stream's 31
classes, 1-2 per task) of 30 steps at batch 128, the default's θ0 and total compute, evaluated on
the subsets every 4 tasks and on the full test sets at the end. Every arm is a resumable run of
the continual runner in `<workdir>/<arm>/seed_<s>/` (a rerun reuses finished runs and resumes
an interrupted one); θ0 is made once per seed and shared by every arm. With `--seeds N` each
number is the mean over seeds with a 95% bootstrap interval (resampling seeds).

Criteria (final scores on the full test sets; A_KA, A_ZS, GM as in results.json):
  (1) merging: the best EMA-merge of a small sweep of the newest model's weight (0.3, the
      reference's 0.5, 0.7) has a higher GM than fine-tuning, or beats it on A_KA and A_ZS both;
  (2) meta-schedules: the best meta-schedule (by GM) beats the per-task warmup-cosine on A_KA
      and on A_ZS;
  (3) model size: over the stream each bigger CLIP of tiny (0.2M parameters, 32 px) -> mini
      (1.3M, 32 px) -> small (2.7M, 64 px) reaches a higher GM than the one below it (each size
      with its own θ0 made by the same recipe; ~45 minutes on 2 cores, not in the default list);
  (4) replay: without the pretraining and buffer pools (mixture 0/1/0) A_ZS falls by more than
      5 points;
  (5) at equal compute (measured MAF): fine-tuning or fine-tuning + EMA-merge has a higher GM
      than each of EWC, SI, ER and DER;
  (6) at equal compute, LoRA, DoRA and VeRA each reach an A_KA lower than fine-tuning's by more
      than 5 points (they under-adapt).
`--smoke` runs the same arms on `fif_synth:smoke` (2 tasks of a few steps) to check the
machinery and the table, not the findings.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np
from ml_collections import config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from clip_step import hardware, write_report  # noqa: E402

from fomo_jax import runtime  # noqa: E402
from fomo_jax.configs import fif_synth  # noqa: E402
from fomo_jax.continual import compare, runner, sweep  # noqa: E402

KEYS = ("knowledge_accumulation", "zero_shot_retention", "geometric_mean")
SHORT = {"knowledge_accumulation": "A_KA", "zero_shot_retention": "A_ZS", "geometric_mean": "GM"}
EQUAL = {"equal_compute": True, "budget": "measured"}

# arm -> how it differs from the study config: a method variant (sweep syntax), a schedule
# variant, and dotted config keys.
ARMS = {
    "finetune": {},
    "ema_merge_w0.3": {
        "method": "ema_merge",
        "set": {"methods.ema_merge.merge.weights": (0.3, 0.7)},
    },
    "ema_merge_w0.5": {"method": "ema_merge"},  # the reference's ½θ_k + ½m_{k-1}
    "ema_merge_w0.7": {
        "method": "ema_merge",
        "set": {"methods.ema_merge.merge.weights": (0.7, 0.3)},
    },
    "warmup_cosine_meta": {"schedule": "warmup_cosine_meta"},
    "rsqrt_meta": {"schedule": "rsqrt_meta"},
    "rsqrt_meta_continued": {"schedule": "rsqrt_meta:meta_mode=continued"},
    "mini": {"set": {"model.name": "mini"}},
    "small": {"set": {"model.name": "small"}},
    "no_replay": {"set": {"mixture": {"pretraining": 0.0, "update": 1.0, "buffer": 0.0}}},
    "ema_merge_equal_compute": {"method": "ema_merge", "set": EQUAL},
    # EWC's Fisher over 2 batches of the update pool, not the reference's 98: the reference's
    # tasks are 1420 steps and its 98 batches would cost EWC every step of a 30-step task at
    # equal compute (98 x 30 / 1420 = 2). Set before any run.
    "ewc_equal_compute": {"method": "ewc", "set": {**EQUAL, "methods.ewc.fisher_batches": 2}},
    **{f"{m}_equal_compute": {"method": m, "set": EQUAL} for m in ("si", "er", "der")},
    **{f"{m}_equal_compute": {"method": m, "set": EQUAL} for m in ("lora", "dora", "vera")},
}
# Full fine-tuning at equal compute is full fine-tuning (MAF_finetune / MAF_finetune = 1): the
# "finetune" arm stands for it in (5) and (6).

FINDINGS = {
    1: ("merging gives the best accumulation-retention trade-off",
        ["finetune", "ema_merge_w0.3", "ema_merge_w0.5", "ema_merge_w0.7"]),
    2: ("LR meta-schedules improve accumulation and retention",
        ["finetune", "warmup_cosine_meta", "rsqrt_meta", "rsqrt_meta_continued"]),
    3: ("bigger models adapt better over a long horizon", ["finetune", "mini", "small"]),
    4: ("replay is essential", ["finetune", "no_replay"]),
    5: ("fine-tuning + merging beats specialised continual methods at equal compute",
        ["finetune", "ema_merge_equal_compute", "ewc_equal_compute", "si_equal_compute",
         "er_equal_compute", "der_equal_compute"]),
    6: ("PEFT under-adapts at equal compute",
        ["finetune", "lora_equal_compute", "dora_equal_compute", "vera_equal_compute"]),
}  # fmt: skip
# Every change made to the study after one of its runs, in order (none retunes a finding).
CHANGES = [
    "EWC's Fisher: 2 batches instead of the reference's 98, after a smoke call stopped before "
    "any EWC training (at equal compute, 98 batches leave EWC no step of a 30-step task "
    "either); no EWC result had been seen.",
    "Finding (3): the ladder tiny -> mini -> small (the `mini` variant added) and its criterion "
    "(GM rising with every size), written after the results of (1), (2), (4)-(6) and before any "
    "run of (3).",
    "Figure titles shortened; per-arm minutes read from each run's results.json (a rerun that "
    "reuses finished runs reported 0 before). No number changed.",
]
DEFAULT_FINDINGS = "1,2,4,5,6"  # (3) trains a second θ0 and a 20x costlier model


def arm_config(base, arm: str, seed: int) -> config_dict.ConfigDict:
    config = config_dict.ConfigDict(base.to_dict())
    spec = ARMS[arm]
    config.seed = seed
    if "method" in spec:
        sweep.method_config(spec["method"], config)
    if "schedule" in spec:
        config.schedule = sweep.schedule_config(spec["schedule"], config)
    for dotted, value in spec.get("set", {}).items():
        value = config_dict.ConfigDict(value) if isinstance(value, dict) else value
        sweep.set_dotted(config, dotted, value)
    return config


def run_arm(base, arm: str, seed: int, workdir: str) -> dict:
    folder = os.path.join(workdir, arm, f"seed_{seed}")
    results = runner.run(arm_config(base, arm, seed), folder)
    return dict(
        final={k: results["final"][k] for k in KEYS},
        trajectory=[{k: p[k] for k in KEYS} for p in results["trajectory"]],
        steps_per_task=results["steps_per_task"],
        # the run's wall time (θ0 included where this run made it; of the last process when
        # resumed), also for a run finished by an earlier call
        seconds=results["wall_seconds_this_process"],
    )


def bootstrap(values, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of `values` (resampled with replacement)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(runs: list[dict]) -> dict:
    """Mean final scores over seeds, their intervals, and the mean trajectory."""
    out = {"seeds": len(runs), "steps_per_task": runs[0]["steps_per_task"],
           "seconds": sum(r["seconds"] for r in runs)}  # fmt: skip
    out["final"] = {k: float(np.mean([r["final"][k] for r in runs])) for k in KEYS}
    out["interval"] = {k: bootstrap([r["final"][k] for r in runs]) for k in KEYS}
    out["trajectory"] = [
        {k: float(np.mean([r["trajectory"][i][k] for r in runs])) for k in KEYS}
        for i in range(len(runs[0]["trajectory"]))
    ]
    return out


def verdict(finding: int, arms: dict) -> tuple[bool, str]:
    """(passes, the numbers it rests on) for finding 1-6 by the criteria of the docstring."""
    f = {name: a["final"] for name, a in arms.items()}
    ka, zs, gm = (lambda n: f[n]["knowledge_accumulation"], lambda n: f[n]["zero_shot_retention"],
                  lambda n: f[n]["geometric_mean"])  # fmt: skip
    ft = "finetune"
    if finding == 1:
        merges = [n for n in arms if n.startswith("ema_merge_w")]
        best = max(merges, key=gm)
        both = [n for n in merges if ka(n) > ka(ft) and zs(n) > zs(ft)]
        ok = gm(best) > gm(ft) or bool(both)
        return ok, (f"best EMA-merge {best}: GM {gm(best):.2f} vs fine-tuning {gm(ft):.2f}; "
                    f"beating it on A_KA and A_ZS: {', '.join(both) or 'none'}")  # fmt: skip
    if finding == 2:
        metas = [n for n in arms if n != ft]
        best = max(metas, key=gm)
        ok = ka(best) > ka(ft) and zs(best) > zs(ft)
        return ok, (f"best meta-schedule {best}: A_KA {ka(best):.2f} / A_ZS {zs(best):.2f} vs "
                    f"warmup-cosine {ka(ft):.2f} / {zs(ft):.2f}")  # fmt: skip
    if finding == 3:
        ok = gm(ft) < gm("mini") < gm("small")
        return ok, f"GM tiny {gm(ft):.2f}, mini {gm('mini'):.2f}, small {gm('small'):.2f}"
    if finding == 4:
        drop = zs(ft) - zs("no_replay")
        return (
            drop > 5,
            f"A_ZS {zs(ft):.2f} with replay, {zs('no_replay'):.2f} without ({drop:+.2f})",
        )
    if finding == 5:
        ours = max(ft, "ema_merge_equal_compute", key=gm)
        others = [n for n in arms if n not in (ft, "ema_merge_equal_compute")]
        beaten = [n for n in others if gm(ours) > gm(n)]
        return len(beaten) == len(others), (
            f"{ours} GM {gm(ours):.2f}; " + ", ".join(f"{n} {gm(n):.2f}" for n in others)
        )
    if finding == 6:
        pefts = [n for n in arms if n != ft]
        under = [n for n in pefts if ka(n) < ka(ft) - 5]
        return len(under) == len(pefts), (
            f"A_KA fine-tuning {ka(ft):.2f}; " + ", ".join(f"{n} {ka(n):.2f}" for n in pefts)
        )
    raise ValueError(f"no finding {finding}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/fif_findings_cpu")
    parser.add_argument("--workdir", default="runs/fif_findings")
    parser.add_argument("--data", default=None, help="fif_synth root (default: the config's)")
    parser.add_argument("--findings", default=DEFAULT_FINDINGS)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="fif_synth:smoke; machinery only")
    args = parser.parse_args(argv)
    runtime.quiet_checkpoint_logs()
    runtime.enable_compilation_cache()
    base = fif_synth.get_config("smoke" if args.smoke else "study")
    if args.data:
        base.data.root = args.data
    findings = [int(x) for x in args.findings.split(",")]
    started = time.perf_counter()
    arms = {}
    for arm in dict.fromkeys(a for n in findings for a in FINDINGS[n][1]):
        runs = [run_arm(base, arm, seed, args.workdir) for seed in range(args.seeds)]
        arms[arm] = summarise(runs)
        print(f"{arm}: " + ", ".join(f"{SHORT[k]} {arms[arm]['final'][k]:.2f}" for k in KEYS),
              flush=True)  # fmt: skip
    figures = os.path.join(os.path.dirname(os.path.abspath(args.out)), "fif_findings")
    os.makedirs(figures, exist_ok=True)
    results = {}
    for n in findings:
        title, names = FINDINGS[n]
        ok, why = verdict(n, {a: arms[a] for a in names})
        figure = os.path.join(figures, f"finding_{n}.png")
        compare.plot_trajectories({a: arms[a] for a in names}, figure, title=f"Finding ({n})")
        where = os.path.relpath(figure, os.path.dirname(os.path.abspath(args.out)))
        results[n] = dict(claim=title, arms=names, passes=ok, numbers=why, figure=where)
    report = dict(
        date=datetime.date.today().isoformat(),
        command="python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        hardware=hardware(),
        config="fif_synth:smoke" if args.smoke else "fif_synth:study",
        study=dict(
            num_tasks=base.num_tasks,
            steps_per_task=base.steps_per_task,
            batch_size=base.batch_size,
            model=base.model.name,
            theta0_steps=base.theta0.steps,
            eval_every_nth_task=base.eval.every_nth_task,
        ),  # fmt: skip
        seeds=args.seeds,
        wall_seconds=time.perf_counter() - started,
        arms=arms,
        findings=results,
        changes_after_runs=CHANGES,
    )
    write_report(args.out, report, markdown(report))
    return report


def markdown(r) -> str:
    hw, s = r["hardware"], r["study"]
    lines = [
        f"# The paper's findings on fif_synth ({r['date']})",
        "",
        f"Hardware: CPU {hw['cpu']} x {hw['cpu_count']} cores, no accelerator; jax {hw['jax']}.  ",
        f"Command: `{r['command']}` ({r['wall_seconds'] / 60:.1f} min for this call; runs it "
        "found finished are reused). Minutes per arm: the run's own wall time, θ0 included "
        "where that run made it.  ",
        f"Study: `{r['config']}`: {s['num_tasks']} tasks x {s['steps_per_task']} steps of batch "
        f"{s['batch_size']}, the {s['model']} CLIP from a θ0 of {s['theta0_steps']} steps, "
        f"evaluated every {s['eval_every_nth_task']} tasks; {r['seeds']} seed(s). Criteria: "
        "the docstring of `benchmarks/fif_findings.py`, written before the runs.",
        "",
        "| finding | passes | numbers | figure |",
        "|---|---|---|---|",
    ]
    for n, f in r["findings"].items():
        lines.append(f"| ({n}) {f['claim']} | {'yes' if f['passes'] else 'no'} | {f['numbers']} "
                     f"| [{os.path.basename(f['figure'])}]({f['figure']}) |")  # fmt: skip
    lines += ["", "| arm | steps/task | final A_KA | final A_ZS | final GM | minutes |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, a in r["arms"].items():
        cells = []
        for k in KEYS:
            low, high = a["interval"][k]
            cells.append(f"{a['final'][k]:.2f}" + (f" [{low:.1f}, {high:.1f}]" if a["seeds"] > 1
                                                     else ""))  # fmt: skip
        lines.append(f"| {name} | {a['steps_per_task']} | " + " | ".join(cells)
                     + f" | {a['seconds'] / 60:.1f} |")  # fmt: skip
    lines += ["", "Changes made to the study after one of its runs:", ""]
    lines += [f"- {change}" for change in r["changes_after_runs"]]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
