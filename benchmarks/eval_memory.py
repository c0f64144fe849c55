"""Host memory of a run's evaluation: decoded test images in memory against on disk.

The continual runner keeps decoded test images in `.npy` files (`<workdir>/eval_images`, or
`config.eval.cache_dir`) read one batch at a time (`evaluate.DiskImages`); the one-shot
`evaluate_datasets` and older runs held every decoded test set in host memory. This script
builds the `Evaluator` both ways on fif_synth test sets transformed at 224 px and runs one full
evaluation of a tiny CLIP (224-px input, 32-px patches), each in a fresh process, and reports:

- peak RSS (VmHWM: everything resident at the worst moment, mapped files such as the shared
  libraries included), and the peak of anonymous RSS (RssAnon, sampled every 20 ms: memory
  the process owns; the kernel cannot drop it under pressure);
- the bytes of decoded images, so the difference can be read against it;
- the same two peaks for the smoke continual run (`run.py --config=...:smoke`).

    python benchmarks/eval_memory.py  # 2-core dev machine: about 2 minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class AnonPeak:
    """The highest RssAnon seen by a sampling thread."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self.stop = 0, every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _status("RssAnon"))
            time.sleep(self.every)

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return max(self.peak, _status("RssAnon"))


def child(mode: str, root: str, image_size: int, cache: str) -> dict:
    """One evaluator built and run in this process; its memory peaks."""
    sampler = AnonPeak()
    from fomo_jax import evaluate, models
    from fomo_jax.data import fif_synth
    from fomo_jax.tokenizer import ByteTokenizer

    base = models.get_config("tiny")
    # The tiny widths at ViT-B/32's geometry (patch 32: 50 tokens at 224 px).
    vision = dataclasses.replace(base.vision, image_size=image_size, patch_size=32)
    config = base.replace(vision=vision, text=dataclasses.replace(base.text, context_length=64))
    model = models.create_model(config, seed=0)
    datasets = fif_synth.load_datasets(root)
    start = time.perf_counter()
    evaluator = evaluate.Evaluator(root, datasets, ByteTokenizer(64), image_size, batch_size=256,
                                   cache_dir=cache if mode == "disk" else None)  # fmt: skip
    built = time.perf_counter() - start
    results = evaluator.evaluate(model, subset=False)
    images = sum(len(s.images) for s in evaluator.sets)
    return dict(mode=mode, images=images, decoded_bytes=images * image_size**2 * 3,
                build_seconds=built, total_seconds=time.perf_counter() - start,
                peak_rss=_status("VmHWM"), peak_anon_rss=sampler.close(),
                headline={k: evaluate.headline(v) for k, v in results.items()})  # fmt: skip


def smoke_run(workdir: str, data_root: str) -> dict:
    """The smoke continual run in a child process, sampled from outside (/proc/<pid>)."""
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "run.py"),
                                "--config=configs/fif_synth.py:smoke", f"--workdir={workdir}",
                                f"--config.data.root={data_root}"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    peak_anon, peak_rss = 0, 0
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as f:
                fields = {line.split(":")[0]: line.split()[1] for line in f
                          if line.startswith(("RssAnon:", "VmHWM:"))}  # fmt: skip
            peak_anon = max(peak_anon, int(fields.get("RssAnon", 0)) * 1024)
            peak_rss = max(peak_rss, int(fields.get("VmHWM", 0)) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.02)
    assert process.returncode == 0, process.returncode
    folder = os.path.join(workdir, "eval_images")
    on_disk = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
                  if n.endswith(".npy"))  # fmt: skip
    return dict(peak_rss=peak_rss, peak_anon_rss=peak_anon, eval_images_on_disk=on_disk)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["memory", "disk"])
    parser.add_argument("--root")
    parser.add_argument("--cache")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--test_per_class", type=int, nargs="+", default=[60, 180])
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks/results/eval_memory_cpu"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root, args.image_size, args.cache)))
        return
    from fomo_jax.data import fif_synth

    scratch = tempfile.mkdtemp(prefix="eval_memory_")
    rows = []
    for per_class in args.test_per_class:
        root = os.path.join(scratch, f"data_{per_class}")
        fif_synth.generate(root, test_per_class=per_class, train_per_class=4, pool_size=200)
        pair = {}
        for mode in ("memory", "disk"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--root", root,
                                  "--cache", os.path.join(scratch, f"cache_{per_class}"),
                                  "--image_size", str(args.image_size)],
                                 cwd=REPO, capture_output=True, text=True, check=True)  # fmt: skip
            pair[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        assert pair["memory"]["headline"] == pair["disk"]["headline"]  # the same evaluation
        rows += [pair["memory"], pair["disk"]]
    smoke = smoke_run(os.path.join(scratch, "smoke"), os.path.join(scratch, "smoke_data"))
    report = dict(
        command="python benchmarks/eval_memory.py", date=datetime.date.today().isoformat(),
        hardware=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        image_size=args.image_size, rows=rows, smoke_run=smoke,
    )  # fmt: skip
    mib = 2**20
    lines = [
        f"# Host memory of evaluation ({report['date']}, {report['hardware']})", "",
        f"`{report['command']}`: fif_synth test sets transformed at {args.image_size} px, one "
        "Evaluator built and run (full test sets, batch 256) in a fresh process each way; the "
        "two ways give identical scores. Peak anonymous RSS is memory the process owns; peak "
        "RSS also counts its mapped files (shared libraries). Images on disk are read with "
        "plain reads: the page cache holds them, not the process.", "",
        "| test images | decoded (MiB) | decoded images | peak RSS (MiB) | peak anonymous RSS "
        "(MiB) | build + evaluate (s) |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    labels = dict(memory="in host memory", disk="on disk (the runner)")
    for r in rows:
        lines.append(f"| {r['images']} | {r['decoded_bytes'] / mib:.0f} | {labels[r['mode']]} | "
                     f"{r['peak_rss'] / mib:.0f} | {r['peak_anon_rss'] / mib:.0f} | "
                     f"{r['total_seconds']:.1f} |")  # fmt: skip
    lines += ["", f"Smoke continual run (`run.py --config=configs/fif_synth.py:smoke`, whole "
              f"process): peak RSS {smoke['peak_rss'] / mib:.0f} MiB, peak anonymous RSS "
              f"{smoke['peak_anon_rss'] / mib:.0f} MiB; its decoded test images, "
              f"{smoke['eval_images_on_disk'] / mib:.2f} MiB, are on disk.", ""]  # fmt: skip
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
