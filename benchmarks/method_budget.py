"""MAF of every continual method, measured from its compiled step, next to the paper's Table 4.

Each method's own continual step (`fomo_jax.continual.step`: its architecture, trained
parameter set, loss and state update) is compiled for a ViT-B/16 CLIP at batch 512 and never
run; XLA's cost analysis gives FLOPs/step and its buffer assignment the peak memory
(`fomo_jax.budget.profile_method`). Mult and MAF are relative to full fine-tuning measured the
same way, and steps per task follow the spec's formula (§5.1). EWC's Fisher pass (98
forward+backward passes per task) happens outside the step; as in the paper it is charged per
step, here at the update-pool batch size our Fisher pass uses (259 at the default mixture).

    python benchmarks/method_budget.py                      # ViT-B/16, batch 512 (CPU: ~15 min)
    python benchmarks/method_budget.py --model tiny --batch 64 --out /tmp/budget   # quick check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import fif_synth  # noqa: E402
from fomo_jax import budget, models  # noqa: E402
from fomo_jax import params as params_lib  # noqa: E402
from fomo_jax.continual import runner  # noqa: E402
from fomo_jax.data import mixture  # noqa: E402
from fomo_jax.models.clip import abstract_clip  # noqa: E402
from fomo_jax.train import optimizer  # noqa: E402
from fomo_jax.train.step import make_loss_fn  # noqa: E402

# (row key, method, hyperparameters); the key is Table 4's where the paper has the method.
ROWS = [
    ("finetune", "finetune", {}),
    ("locked_text", "locked_text", {}),
    ("locked_image", "locked_image", {}),
    ("lnfit", "lnfit", {}),
    ("bitfit", "bitfit", {}),
    *[(f"{kind}_r{r}", kind, {"rank": r}) for kind in ("lora", "dora", "vera") for r in (4, 64)],
    ("ewc", "ewc", {}),
    ("si", "si", {}),
    ("zs_merge", "zs_merge", {}),
    ("ft_merge", "ft_merge", {}),
    ("ema_merge", "ema_merge", {}),
    ("offline_merge", "offline_merge", {}),
    ("double_merge", "double_merge", {}),
    ("er", "er", {}),
    ("der", "der", {}),
    ("derpp", "derpp", {}),
    ("zscl", "zscl", {}),
    ("ema_online", "ema_online", {}),
]


def grad_pass_flops(model_config, batch_size: int) -> float:
    """FLOPs of one CLIP-loss forward+backward (a Fisher-pass batch), compiled, never run."""
    graphdef, params = params_lib.split(abstract_clip(model_config))
    size, length = model_config.vision.image_size, model_config.text.context_length
    batch = {
        "images": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
        "token_ids": jax.ShapeDtypeStruct((batch_size, length), jnp.int32),
    }
    grad = jax.jit(jax.grad(lambda p, b: make_loss_fn(graphdef)(p, b)[0]))
    cost = grad.lower(params, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/method_budget_cpu")
    args = parser.parse_args()

    model_config = models.get_config(args.model)
    config = fif_synth.get_config()
    config.batch_size = args.batch
    tx = optimizer.adamw()
    profiles, extra = {}, {}
    for key, name, overrides in ROWS:
        config.method = name
        config.methods[name].update(overrides)
        method = runner.profiling_instance(config, model_config)
        profiles[key] = budget.profile_method(method, model_config, tx, args.batch)
        print(f"{key:14s} {profiles[key]['flops'] / 1e9:12.1f} GFLOPs/step  "
              f"{profiles[key]['peak_bytes'] / 1e9:8.2f} GB  "
              f"(compile {profiles[key]['compile_seconds']:.0f} s)", flush=True)  # fmt: skip
    # EWC: the per-task Fisher pass charged per step (spec §5.2), 98 batches of the update pool.
    update_batch = mixture.pool_batch_sizes(args.batch, dict(config.mixture), 1)["update"]
    fisher_batches = int(config.methods.ewc.fisher_batches)
    fisher = fisher_batches * grad_pass_flops(model_config, update_batch)
    profiles["ewc"] = dict(profiles["ewc"], flops=profiles["ewc"]["flops"] + fisher)
    extra["ewc_fisher"] = dict(batches=fisher_batches, batch_size=update_batch,
                               gflops_per_task=fisher / 1e9)  # fmt: skip

    rows = budget.budget_table(profiles=profiles, methods=[k for k, _, _ in ROWS])
    report = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "hardware": f"{jax.devices()[0].platform} x {jax.device_count()}, {platform.processor()}"
        f" ({os.cpu_count()} cores), jax {jax.__version__}",
        "model": args.model,
        "batch_size": args.batch,
        "rows": rows,
        "profiles": profiles,
        "extra": extra,
        "paper": {k: vars(v) for k, v in budget.PAPER_TABLE.items()},
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))


def markdown(report) -> str:
    lines = [
        f"# Method budgets: measured MAF vs the paper's Table 4 ({report['date']})",
        "",
        f"Model {report['model']}, batch {report['batch_size']}; {report['hardware']}.  ",
        f"Command: `{report['command']}`",
        "",
        "Measured: XLA cost analysis (FLOPs) and buffer assignment (peak bytes) of each "
        "method's compiled continual step; Mult and MAF relative to full fine-tuning measured "
        "the same way; T_s by the spec's formula. Paper: Table 4 as printed.",
        "",
        "| method | GFLOPs/step | paper | mem (GB) | paper | Mult | paper | MAF | paper "
        "| T_s (T=20) | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        paper = report["paper"].get(row["method"])

        def p(field, fmt, paper=paper):
            return format(paper[field], fmt) if paper else "—"

        paper_steps = str(paper["steps"].get(20, paper["steps"].get("20"))) if paper else "—"
        lines.append(
            f"| {row['method']} | {row['gflops']:.1f} | {p('gflops', '.1f')} "
            f"| {row['memory_gb']:.2f} | {p('memory_gb', '.2f')} | {row['mult']:.4f} "
            f"| {p('mult', '.4f')} | {row['maf']:.1f} | {p('maf', '.1f')} "
            f"| {row['steps'][20]} | {paper_steps} |"
        )
    fisher = report["extra"].get("ewc_fisher")
    if fisher:
        lines += ["", f"EWC includes its Fisher pass, {fisher['batches']} batches of "
                  f"{fisher['batch_size']}: {fisher['gflops_per_task']:.1f} GFLOPs per task, "
                  "charged per step as in the paper."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
