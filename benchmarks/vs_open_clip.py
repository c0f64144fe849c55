"""The CLIP train step in fomo_jax and in open_clip (PyTorch), side by side in one run.

    pip install --no-deps open_clip_torch==3.3.0   # beside the CPU torch of '.[dev]'
    python benchmarks/vs_open_clip.py --models tiny:128,ViT-B-32:16 \
        --out benchmarks/results/vs_open_clip_cpu

The same model (fomo_jax's random initialisation, exported with `export_openclip` and loaded
into `open_clip.model.CLIP` with `strict=True`), the same batch (random pixels, 20-token
captions in the full context), the same optimizer (AdamW, weight decay 0.2 on every
parameter, global-norm clip 1.0, learning rate 1e-4) and the same threads (torch uses every
core, as XLA's CPU client does). Each side's losses over the first `--check_steps` steps
on that batch are recorded: equal losses show that both sides do the same work. Then
`--steps` steps are timed on each side, alternating the sides `--rounds` times so that a
shared machine's drift hits both; the median step time is reported.

open_clip's package imports torchvision (for its image transforms and one BatchNorm helper),
and PyPI's torchvision does not load beside the CPU torch build (its operators fail to
register). Only `open_clip.model.CLIP` and `open_clip.loss.ClipLoss` are used here, so when
torchvision cannot be imported a stand-in module that fails on use is put in its place; the
timed code never touches it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clip_step import hardware, inputs, median_time, parse_pairs, write_report  # noqa: E402

from fomo_jax import models, runtime, sharding  # noqa: E402
from fomo_jax import params as params_lib  # noqa: E402
from fomo_jax.continual.loop import finetuning  # noqa: E402
from fomo_jax.train import optimizer  # noqa: E402

LR, WEIGHT_DECAY, CLIP_NORM = 1e-4, 0.2, 1.0


def import_open_clip():
    """open_clip, with a stand-in torchvision when the real one cannot load (module doc)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or PyPI's build beside the CPU torch (operator errors)
        try:  # open_clip imports transformers: let it see the real (absent) torchvision
            import transformers  # noqa: F401
        except ImportError:
            pass
        for name in list(sys.modules):
            if name == "torchvision" or name.startswith("torchvision."):
                del sys.modules[name]

        class _Any(type):  # attributes of the stand-in's names (InterpolationMode.BICUBIC)
            def __getattr__(cls, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return cls

        class _Unavailable(metaclass=_Any):
            def __init__(self, *args, **kwargs):
                raise RuntimeError("torchvision is not available in this environment")

        def attribute(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Unavailable

        def module(name):
            stub = types.ModuleType(name)
            stub.__getattr__ = attribute
            stub.__path__ = []
            sys.modules[name] = stub
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, stub)

        for name in ("torchvision", "torchvision.transforms", "torchvision.ops",
                     "torchvision.transforms.functional", "torchvision.ops.misc"):  # fmt: skip
            module(name)
    import open_clip

    return open_clip


def open_clip_model(open_clip, cfg: models.CLIPConfig, path: str):
    """`open_clip.model.CLIP` of `cfg`'s architecture with the weights in `path`."""
    import torch
    from safetensors.torch import load_file

    v, t = cfg.vision, cfg.text
    model = open_clip.model.CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=v.layers,
            width=v.width,
            head_width=v.width // v.heads,
            mlp_ratio=v.mlp_dim / v.width,
            patch_size=v.patch_size,
            image_size=v.image_size,
        ),
        text_cfg=open_clip.model.CLIPTextCfg(
            context_length=t.context_length,
            vocab_size=t.vocab_size,
            width=t.width,
            heads=t.heads,
            layers=t.layers,
            mlp_ratio=t.mlp_dim / t.width,
        ),
        quick_gelu=cfg.activation == "quick_gelu",
    )
    model.load_state_dict(load_file(path), strict=True)
    return model.train().to(torch.float32)


def bench(open_clip, name, batch, steps, check_steps, rounds, device="cpu", dtype="float32"):
    """One model:batch. `device` is torch's ("cpu" or "cuda"; JAX uses its default device);
    `dtype` the compute dtype: bfloat16 is fomo_jax's bf16 compute and open_clip's bf16
    autocast (AMP), parameters float32 on both sides."""
    import torch

    torch.set_num_threads(os.cpu_count())
    cfg = models.get_config(name, dtype=dtype)
    model = models.create_model(cfg)
    with tempfile.TemporaryDirectory() as tmp:  # the same weights on both sides
        path = os.path.join(tmp, "model.safetensors")
        models.export_openclip(model, path)
        theirs = open_clip_model(open_clip, cfg, path).to(device)
    graphdef, params = params_lib.split(model)
    del model
    pixels, ids = inputs(cfg, batch)
    data = {"pixels": pixels, "token_ids": ids}

    tx = optimizer.adamw(weight_decay=WEIGHT_DECAY, clip_norm=CLIP_NORM)
    step, state = finetuning(graphdef, tx, sharding.make_mesh(), params)
    compiled = step.lower(state, data, LR).compile()
    holder = {"state": state}

    def ours():
        holder["state"], metrics = compiled(holder["state"], data, LR)
        return float(metrics["loss"])

    torch_pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(device)
    torch_ids = torch.from_numpy(ids.astype(np.int64)).to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    loss_fn = open_clip.loss.ClipLoss()
    opt = torch.optim.AdamW(
        theirs.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY
    )

    def open_clip_step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            image, text, scale = theirs(torch_pixels, torch_ids)
            loss = loss_fn(image, text, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), CLIP_NORM)
        opt.step()
        return float(loss.detach())

    losses_ours = [ours() for _ in range(check_steps)]
    losses_theirs = [open_clip_step() for _ in range(check_steps)]
    t_ours, t_theirs = [], []
    for _ in range(rounds):
        t_ours.append(median_time(ours, steps))
        t_theirs.append(median_time(open_clip_step, steps))
    seconds_ours, seconds_theirs = float(np.median(t_ours)), float(np.median(t_theirs))
    return {
        "model": name,
        "batch": batch,
        "device": device,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "params_millions": optimizer.trainable_count(params) / 1e6,
        "losses_fomo_jax": losses_ours,
        "losses_open_clip": losses_theirs,
        "max_loss_rel_diff": max(
            abs(a - b) / abs(b) for a, b in zip(losses_ours, losses_theirs, strict=True)
        ),
        "fomo_jax_step_seconds": seconds_ours,
        "open_clip_step_seconds": seconds_theirs,
        "fomo_jax_samples_per_second": batch / seconds_ours,
        "open_clip_samples_per_second": batch / seconds_theirs,
        "speedup": seconds_theirs / seconds_ours,
        "rounds_fomo_jax": t_ours,
        "rounds_open_clip": t_theirs,
    }


def markdown(report) -> str:
    hw = report["hardware"]
    lines = [
        f"# CLIP train step: fomo_jax vs open_clip ({report['date']})",
        "",
        f"Hardware: CPU {hw['cpu']} x {hw['cpu_count']} cores, no accelerator; jax "
        f"{hw['jax']}, torch {report['torch']}, open_clip {report['open_clip']}.  ",
        f"Command: `{report['command']}`",
        "",
        "Same weights, batch, optimizer (AdamW, wd 0.2 on all parameters, clip 1.0, lr 1e-4) "
        "and threads; open_clip in eager mode (bfloat16: torch autocast, fomo_jax bf16 compute; "
        "parameters float32 on both). *losses* are each side's first "
        f"{report['check_steps']} steps on the same batch (equal losses: the same work). "
        f"Step times are medians of {report['rounds']} alternating rounds, each the median of "
        f"at least {report['steps']} steps.",
        "",
        "| model | batch | device | dtype | params (M) | losses fomo_jax | losses open_clip | "
        "max rel. diff | "
        "fomo_jax step (s) | open_clip step (s) | fomo_jax samples/s | open_clip samples/s | "
        "speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ours = ", ".join(f"{x:.5f}" for x in r["losses_fomo_jax"])
        theirs = ", ".join(f"{x:.5f}" for x in r["losses_open_clip"])
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['device']} | {r['dtype']} | "
            f"{r['params_millions']:.1f} | {ours} | {theirs} | "
            f"{r['max_loss_rel_diff']:.1e} | {r['fomo_jax_step_seconds']:.4f} | "
            f"{r['open_clip_step_seconds']:.4f} | {r['fomo_jax_samples_per_second']:.1f} | "
            f"{r['open_clip_samples_per_second']:.1f} | **{r['speedup']:.2f}x** |"
        )
    lines += [
        "",
        "*speed-up* = open_clip step time / fomo_jax step time (above 1: fomo_jax is faster). "
        "open_clip's own training script also clamps `logit_scale` after each step; neither "
        "side does here.",
    ]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny:128,ViT-B-32:16", help="model:batch pairs")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    parser.add_argument("--check_steps", type=int, default=3, help="steps whose losses agree")
    parser.add_argument("--device", default="cpu", help="torch's device: cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="compute dtype: float32, bfloat16")
    parser.add_argument("--out", default="benchmarks/results/vs_open_clip_cpu")
    args = parser.parse_args()
    runtime.enable_compilation_cache()
    open_clip = import_open_clip()
    import torch

    rows = [
        bench(
            open_clip,
            name,
            batch,
            args.steps,
            args.check_steps,
            args.rounds,
            args.device,
            args.dtype,
        )  # fmt: skip
        for name, batch in parse_pairs(args.models)
    ]
    report = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "hardware": hardware(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "steps": args.steps,
        "rounds": args.rounds,
        "check_steps": args.check_steps,
        "rows": rows,
    }
    write_report(args.out, report, markdown(report))


if __name__ == "__main__":
    main()
