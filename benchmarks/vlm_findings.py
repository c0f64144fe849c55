"""VILA's and Idefics2's findings at toy scale, and what continual updates do to a VLM, on the
synthetic vision-language world, each checked against a threshold written before any run.

    python benchmarks/vlm_findings.py --out benchmarks/results/vlm_findings_cpu
    python benchmarks/vlm_findings.py --seeds 3            # an accelerator: bootstrap intervals
    python benchmarks/vlm_findings.py --smoke --workdir /tmp/vf --out /tmp/vf/table

Recipe arms change one stage of θ0's staged recipe (`configs/vlm_synth.py`: LM pretraining ->
world CLIP -> connector alignment -> VL pretraining -> SFT, `data.vlm_stream`); the stages
before the change come from the shared stage cache under `<workdir>/seed_<s>/`, so every arm
starts from identical backbones. An arm's weights after the stage it is read at are scored by
the world's evaluation (`evaluate_vlm`): VQA = mean accuracy on colour, shape, position and
count questions; text retention = the held-out facts (multiple choice and cloze), which only
LM pretraining saw; k-shot binding = the binding questions after k demonstrations. The
continual arms (e) are runs of the continual runner over the stream's skills from the default
θ0 (A_KA, A_ZS, text retention as in results.json). A rerun reuses finished arms and resumes an
interrupted stage or run.

Thresholds (issue 24):
  (a) VILA: VL pretraining on pairs only, LM unfrozen, keeps >= 5 points less text retention
      than interleaved documents at equal steps; reordered documents and the recipe's mixture
      are reported beside them (reordering breaks k-shot binding).
  (b) VILA: SFT with ~20% text-only instructions after pairs-only pretraining recovers at
      least half of the text retention pairs-only pretraining lost (against the connector
      stage, before any VL pretraining), while VQA moves <= 2 points.
  (c) VILA / Idefics2: the LM frozen, LoRA on it, or trained in full during VL pretraining:
      VQA, text retention and k-shot binding reported; the frozen arm's text retention equals
      the connector stage's exactly (the frozen LM's text outputs are θ0's).
  (d) Idefics2: a Perceiver connector pooling the 16 visual tokens to 4 stays within 2 points
      of the MLP connector on colour and shape; what it loses on count and position is reported.
  (e) FoMo-in-Flux for VLMs: fine-tuning, LoRA and ema_merge, each with text replay 0 and 1/3
      of the pretraining pool: ema_merge keeps >= 2 points more A_ZS than fine-tuning,
      fine-tuning reaches >= 2 points more A_KA than LoRA, and replay adds >= 5 points of text
      retention to fine-tuning.
Not built yet, reported as such: docs->pairs (a two-phase VL stage), the equal-images-seen
comparison of (a), the LM-only control of (b).
`--smoke` runs every arm on `vlm_synth:smoke` to check the machinery and the table, not the
findings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
from ml_collections import config_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from clip_step import hardware, write_report  # noqa: E402
from fif_findings import bootstrap  # noqa: E402

from fomo_jax import runtime, sharding  # noqa: E402
from fomo_jax.configs import vlm_synth  # noqa: E402
from fomo_jax.continual import compare, runner, sweep  # noqa: E402
from fomo_jax.data import vlm_stream  # noqa: E402

VQA = ("colour", "shape", "position", "count")
LORA_LM = {"trainable": (("connector/.*", "full"), ("lm/.*", "lora")), "method": "lora",
           "method_options": {"targets": "lm", "rank": 8}}  # fmt: skip
PAIRS_ONLY = {"theta0.stages.vl.sources": {"pairs": 1.0}}
# arm -> (the stage its weights are read after, dotted config keys it changes)
RECIPE_ARMS = {
    "connector_stage": ("connector", {}),  # before any VL pretraining: the reference of (b), (c)
    "vl_pairs": ("vl", PAIRS_ONLY),
    "vl_interleaved": ("vl", {"theta0.stages.vl.sources": {"documents": 1.0}}),
    "vl_reordered": ("vl", {"theta0.stages.vl.sources": {"reordered": 1.0}}),
    "vl_mixture": ("vl", {}),  # the recipe's own: pairs, documents and LM text; the LM in full
    "vl_lm_frozen": ("vl", {"theta0.stages.vl.trainable": (("connector/.*", "full"),)}),
    "vl_lm_lora": ("vl", {f"theta0.stages.vl.{k}": v for k, v in LORA_LM.items()}),
    "sft_no_text": ("sft", {**PAIRS_ONLY, "theta0.stages.sft.sources": {"vqa": 1.0}}),
    "sft_text": ("sft", {**PAIRS_ONLY, "theta0.stages.sft.sources": {"vqa": 0.8,
                                                                     "text_instr": 0.2}}),
    "mlp_connector": ("sft", {}),  # θ0 itself
    "perceiver_4": ("sft", {"model.vlm.connector": "perceiver", "model.vlm.perceiver_latents": 4,
                            "model.vlm.perceiver_depth": 1, "model.vlm.perceiver_heads": 4,
                            "model.vlm.perceiver_kv_heads": 2,
                            "model.vlm.perceiver_head_dim": 32}),
}  # fmt: skip
NO_TEXT_POOL = {"pairs": 0.35, "vqa": 0.65}  # the default pool's VL part, without text
TEXT_POOL = {"pairs": 0.25, "vqa": 0.42, "text_instr": 0.15, "lm_text_open": 0.18}  # 1/3 text
STREAM_ARMS = {
    f"{method.split(':')[0]}_replay{share}": {"method": method, "data.pretraining_pool": pool}
    for method in ("finetune", "lora:targets=lm", "ema_merge")
    for share, pool in (("0", NO_TEXT_POOL), ("0.33", TEXT_POOL))
}
FINDINGS = {
    "a": ("pairs-only VL pretraining loses more text than interleaved (VILA)",
          ["vl_pairs", "vl_interleaved", "vl_reordered", "vl_mixture"]),
    "b": ("text-only SFT data recovers the lost text (VILA)",
          ["connector_stage", "vl_pairs", "sft_no_text", "sft_text"]),
    "c": ("LM frozen vs LoRA vs full in VL pretraining (VILA, Idefics2)",
          ["connector_stage", "vl_lm_frozen", "vl_lm_lora", "vl_mixture"]),
    "d": ("Perceiver pooling to 1/4 of the visual tokens (Idefics2)",
          ["mlp_connector", "perceiver_4"]),
    "e": ("continual updates: merging keeps, LoRA under-adapts, text replay retains",
          list(STREAM_ARMS)),
}  # fmt: skip
# Every change made to the study after one of its runs, in order.
CHANGES: list[str] = []


def arm_config(base, changes: dict, seed: int) -> config_dict.ConfigDict:
    config = config_dict.ConfigDict(base.to_dict())
    config.seed = seed
    for dotted, value in changes.items():
        if dotted == "method":
            sweep.method_config(value, config)
            continue
        value = config_dict.ConfigDict(value) if isinstance(value, dict) else value
        sweep.set_dotted(config, dotted, value)
    return config


def recipe_arm(base, arm: str, seed: int, workdir: str) -> dict:
    """The world's evaluation of the arm's weights after its stage (cached in the arm's
    folder; the stages in `<workdir>/seed_<s>/`, shared by the arms)."""
    folder = os.path.join(workdir, "recipe", arm, f"seed_{seed}")
    path = os.path.join(folder, "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    started = time.perf_counter()
    stage, changes = RECIPE_ARMS[arm]
    config = arm_config(base, changes, seed)
    family = runner.family_of(config)
    model_config = family.model_config(config)
    tokenizer = family.tokenizer(config, model_config)
    data = runner.prepare_data(config, family, model_config, tokenizer)
    cache = os.path.join(workdir, f"seed_{seed}")
    params = vlm_stream.load_or_make_theta0(config, family, model_config, data, cache,
                                            sharding.make_mesh(), until=stage)  # fmt: skip
    evaluator = family.evaluator(config, data, model_config, tokenizer)
    point = evaluator.evaluate(family.graphdef(model_config), params, subset=False)
    scores = {k: v["accuracy"] for k, v in point["per_dataset"].items()}
    out = dict(
        stage=stage,
        vqa=float(np.mean([scores[k] for k in VQA])),
        text_retention=point["text_retention"],
        scores=scores,
        visual_tokens=model_config.image_seq_length,
        seconds=time.perf_counter() - started,
    )
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return out


def stream_arm(base, arm: str, seed: int, workdir: str) -> dict:
    """A run of the continual runner from the default θ0 (the stage cache of the seed)."""
    config = arm_config(base, STREAM_ARMS[arm], seed)
    config.theta0.cache_dir = os.path.join(workdir, f"seed_{seed}")
    results = runner.run(config, os.path.join(workdir, "stream", arm, f"seed_{seed}"))
    keys = ("knowledge_accumulation", "zero_shot_retention", "text_retention")
    return dict(
        final={k: results["final"][k] for k in keys},
        trajectory=[{k: p[k] for k in keys} for p in results["trajectory"]],
        seconds=results["wall_seconds_this_process"],
    )


def summarise(runs: list[dict], keys) -> dict:
    """Means over seeds, their 95% bootstrap intervals (over seeds), and the raw runs; for
    stream arms the mean trajectory too."""
    flat = [r.get("final", r) for r in runs]
    out = dict(
        seeds=len(runs),
        mean={k: float(np.mean([f[k] for f in flat])) for k in keys},
        interval={k: bootstrap([f[k] for f in flat]) for k in keys},
        runs=runs,
        seconds=float(sum(r["seconds"] for r in runs)),
    )
    if "trajectory" in runs[0]:
        out["final"] = out["mean"]
        points = range(len(runs[0]["trajectory"]))
        out["trajectory"] = [{k: float(np.mean([r["trajectory"][i][k] for r in runs]))
                              for k in keys} for i in points]  # fmt: skip
    return out


def plot_trade_off(arms: dict, path: str, title: str) -> None:
    """VQA against text retention, one point per recipe arm (bars: the seeds' intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, a in arms.items():
        x, y = a["mean"]["text_retention"], a["mean"]["vqa"]
        (xl, xh), (yl, yh) = a["interval"]["text_retention"], a["interval"]["vqa"]
        ax.errorbar(x, y, xerr=[[x - xl], [xh - x]], yerr=[[y - yl], [yh - y]], fmt="o",
                    capsize=3, label=name)  # fmt: skip
    ax.set(xlabel="text retention: held-out facts (%)", ylabel="VQA accuracy (%)", title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _flat(run: dict) -> dict:
    """A recipe arm's eval.json as one level: its scores as "scores.<kind>"."""
    scores = {f"scores.{k}": v for k, v in sorted(run["scores"].items())}
    return dict(vqa=run["vqa"], text_retention=run["text_retention"], **scores,
                seconds=run["seconds"], visual_tokens=run["visual_tokens"])  # fmt: skip


def verdict(finding: str, arms: dict) -> tuple[bool, str]:
    """(passes, the numbers it rests on) for finding (a)-(e) by the docstring's thresholds."""
    m = {name: a["mean"] for name, a in arms.items()}
    text, vqa = (lambda n: m[n]["text_retention"]), (lambda n: m[n]["vqa"])

    def binding(n):
        k = sorted(key for key in m[n] if key.startswith("scores.binding_k"))
        return ", ".join(f"{key.split('_')[-1]} {m[n][key]:.1f}" for key in k)

    if finding == "a":
        gap = text("vl_interleaved") - text("vl_pairs")
        rest = "; ".join(f"{n}: text {text(n):.1f}, VQA {vqa(n):.1f}, binding {binding(n)}"
                         for n in ("vl_reordered", "vl_mixture"))  # fmt: skip
        return gap >= 5, (f"text retention interleaved {text('vl_interleaved'):.1f} vs pairs "
                          f"{text('vl_pairs'):.1f} ({gap:+.1f}); {rest}")  # fmt: skip
    if finding == "b":
        lost = text("connector_stage") - text("vl_pairs")
        recovered = text("sft_text") - text("sft_no_text")
        moved = vqa("sft_text") - vqa("sft_no_text")
        ok = lost > 0 and recovered >= lost / 2 and abs(moved) <= 2
        return ok, (f"pairs-only pretraining lost {lost:.1f} points of text; the text blend "
                    f"recovers {recovered:+.1f}; VQA moves {moved:+.1f}")  # fmt: skip
    if finding == "c":
        same = text("vl_lm_frozen") == text("connector_stage")
        rows = "; ".join(f"{n}: VQA {vqa(n):.1f}, text {text(n):.1f}, binding {binding(n)}"
                         for n in ("vl_lm_frozen", "vl_lm_lora", "vl_mixture"))  # fmt: skip
        return same, f"frozen LM's text retention equals the connector stage's: {same}; {rows}"
    if finding == "d":
        kinds = ("colour", "shape", "count", "position")
        diff = {k: m["perceiver_4"][f"scores.{k}"] - m["mlp_connector"][f"scores.{k}"]
                for k in kinds}  # fmt: skip
        ok = diff["colour"] >= -2 and diff["shape"] >= -2
        tokens = [arms[n]["runs"][0]["visual_tokens"] for n in ("mlp_connector", "perceiver_4")]
        return ok, (f"visual tokens {tokens[0]} -> {tokens[1]}; perceiver - MLP: "
                    + ", ".join(f"{k} {v:+.1f}" for k, v in diff.items()))  # fmt: skip
    if finding == "e":
        ka, zs = (lambda n: m[n]["knowledge_accumulation"]), (lambda n: m[n]["zero_shot_retention"])
        merge = zs("ema_merge_replay0.33") - zs("finetune_replay0.33")
        adapt = ka("finetune_replay0.33") - ka("lora_replay0.33")
        replay = text("finetune_replay0.33") - text("finetune_replay0")
        ok = merge >= 2 and adapt >= 2 and replay >= 5
        return ok, (f"A_ZS ema_merge - finetune {merge:+.1f}; A_KA finetune - LoRA "
                    f"{adapt:+.1f}; text retention of fine-tuning with - without replay "
                    f"{replay:+.1f}")  # fmt: skip
    raise ValueError(f"no finding {finding!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/vlm_findings_cpu")
    parser.add_argument("--workdir", default="runs/vlm_findings")
    parser.add_argument("--findings", default="a,b,c,d,e")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="vlm_synth:smoke; machinery only")
    args = parser.parse_args(argv)
    runtime.quiet_checkpoint_logs()
    runtime.enable_compilation_cache()
    base = vlm_synth.get_config("smoke" if args.smoke else None)
    base.data.root = os.path.join(args.workdir, "world")
    findings = args.findings.split(",")
    started = time.perf_counter()
    arms = {}
    for arm in dict.fromkeys(a for f in findings for a in FINDINGS[f][1]):
        if arm in RECIPE_ARMS:
            runs = [_flat(recipe_arm(base, arm, s, args.workdir)) for s in range(args.seeds)]
            keys = [k for k in runs[0] if k not in ("seconds", "visual_tokens")]
            arms[arm] = summarise(runs, keys)
        else:
            runs = [stream_arm(base, arm, s, args.workdir) for s in range(args.seeds)]
            arms[arm] = summarise(runs, list(runs[0]["final"]))
        print(f"{arm}: " + ", ".join(f"{k} {v:.1f}" for k, v in arms[arm]["mean"].items()
                                     if "." not in k), flush=True)  # fmt: skip
    figures = os.path.join(os.path.dirname(os.path.abspath(args.out)), "vlm_findings")
    os.makedirs(figures, exist_ok=True)
    results = {}
    for f in findings:
        claim, names = FINDINGS[f]
        chosen = {a: arms[a] for a in names}
        ok, why = verdict(f, chosen)
        figure = os.path.join(figures, f"finding_{f}.png")
        if f == "e":
            compare.plot_trajectories(chosen, figure, title="Finding (e)")
        else:
            plot_trade_off(chosen, figure, f"Finding ({f}): VQA vs text retention")
        where = os.path.relpath(figure, os.path.dirname(os.path.abspath(args.out)))
        results[f] = dict(claim=claim, arms=names, passes=ok, numbers=why, figure=where)
    report = dict(
        date=datetime.date.today().isoformat(),
        command="python " + " ".join([os.path.relpath(__file__, ROOT), *(argv or sys.argv[1:])]),
        hardware=hardware(),
        config="vlm_synth:smoke" if args.smoke else "vlm_synth",
        seeds=args.seeds,
        wall_seconds=time.perf_counter() - started,
        arms=arms,
        findings=results,
        changes_after_runs=CHANGES,
    )
    write_report(args.out, report, markdown(report))
    return report


def markdown(r) -> str:
    hw = r["hardware"]
    lines = [
        f"# VILA's and Idefics2's findings and continual VLM updates ({r['date']})",
        "",
        f"Hardware: CPU {hw['cpu']} x {hw['cpu_count']} cores; jax {hw['jax']}.  ",
        f"Command: `{r['command']}` ({r['wall_seconds'] / 60:.1f} min for this call; arms it "
        f"found finished are reused).  ",
        f"Config: `{r['config']}`; {r['seeds']} seed(s). Thresholds: the docstring of "
        "`benchmarks/vlm_findings.py`, written before the runs.",
        "",
        "| finding | passes | numbers | figure |",
        "|---|---|---|---|",
    ]
    for name, f in r["findings"].items():
        link = f"[{os.path.basename(f['figure'])}]({f['figure']})"
        lines.append(f"| ({name}) {f['claim']} | {'yes' if f['passes'] else 'no'} | "
                     f"{f['numbers']} | {link} |")  # fmt: skip
    lines += ["", "| arm | scores (mean over seeds [95% interval]) | minutes |", "|---|---|---|"]
    for name, a in r["arms"].items():
        cells = []
        for k, v in a["mean"].items():
            low, high = a["interval"][k]
            cells.append(f"{k.removeprefix('scores.')} {v:.1f}"
                         + (f" [{low:.1f}, {high:.1f}]" if a["seeds"] > 1 else ""))  # fmt: skip
        lines.append(f"| {name} | {', '.join(cells)} | {a['seconds'] / 60:.1f} |")
    lines += ["", "Changes made to the study after one of its runs:", ""]
    lines += [f"- {change}" for change in r["changes_after_runs"]] or ["- none"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
