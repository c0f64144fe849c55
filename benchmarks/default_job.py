"""The default job (`python run.py`) on a fresh machine: wall time, where it goes, data wait.

    python benchmarks/default_job.py --out benchmarks/results/default_job_cpu

Runs the README's main command, `python run.py`, on an empty data root and work directory
(so fif_synth is generated and θ0 made, as on a fresh checkout) and times it whole. From its
log and files: the time of each stage (start-up and data generation, decoding the training
images into memory, θ0, the stream with its evaluations), the share of each training loop's
time spent getting batches and the idle part of it (`data_wait_fraction` and
`data_wait_idle_fraction` of `metrics.jsonl`, weighted by each interval's time), and the
results. Then, with θ0 cached, the same stream without replay (mixture 0/1/0) for the third
effect. The effects the default job must show: A_KA rises over the stream, A_ZS falls, and A_ZS
falls further without replay.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from clip_step import hardware, write_report  # noqa: E402

STAMP = re.compile(r"^[IWE](\d{4}) (\d\d):(\d\d):(\d\d\.\d+)")


def cpu_times() -> list[int]:
    """/proc/stat's total CPU jiffies: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def steal_share(before, after) -> float:
    """Share of CPU time the hypervisor gave to other guests (steal) between two readings:
    on a shared VM, timings taken while it is high are slow for reasons outside the job."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    return delta[7] / sum(delta) if sum(delta) else 0.0


def run(args, log_path) -> float:
    """Wall seconds of `python run.py ARGS`, its output in `log_path` (fails loudly)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call([sys.executable, "run.py", *args], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)  # fmt: skip
    if code:
        raise SystemExit(f"python run.py {' '.join(args)} exited {code}; see {log_path}")
    return time.perf_counter() - start


def stamps(log_path) -> list[tuple[float, str]]:
    """(seconds of the day, line) of every absl log line."""
    out = []
    with open(log_path) as f:
        for line in f:
            m = STAMP.match(line)
            if m:
                out.append((int(m[2]) * 3600 + int(m[3]) * 60 + float(m[4]), line.rstrip()))
    return out


def first(lines, pattern) -> float | None:
    return next((t for t, line in lines if re.search(pattern, line)), None)


def data_wait(metrics_path, batch_size, skip_windows: int = 0) -> dict:
    """Time-weighted data-wait shares of a loop's `metrics.jsonl` (each logged interval's
    seconds: its steps x batch / samples per second): all of it, and the idle part (no step in
    flight through the wait; the loop's `data_wait_idle_fraction`); the samples and seconds
    they cover. `skip_windows`: leave out the first intervals (compilation)."""
    waited = idle = total = samples = 0.0
    previous = {}
    with open(metrics_path) as f:
        windows = [r for r in map(json.loads, f) if "data_wait_fraction" in r]
    for i, r in enumerate(windows):
        steps = r["step"] - previous.get(r["task"], 0)
        previous[r["task"]] = r["step"]
        if i < skip_windows:
            continue
        seconds = steps * batch_size / r["samples_per_second"]
        waited += seconds * r["data_wait_fraction"]
        idle += seconds * r["data_wait_idle_fraction"]
        total += seconds
        samples += steps * batch_size
    return {"share": waited / total, "idle_share": idle / total, "logged_seconds": total,
            "samples": samples}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/default_job_cpu")
    parser.add_argument("--scratch", default=None, help="default: a new temporary folder")
    parser.add_argument("--no_replay_check", action="store_true", help="skip the 0/1/0 run")
    args = parser.parse_args()
    scratch = args.scratch or tempfile.mkdtemp(prefix="default_job_")
    data, work = os.path.join(scratch, "data"), os.path.join(scratch, "run")
    if os.path.exists(data) or os.path.exists(work):
        raise SystemExit(f"{scratch} is not empty: the job must start from nothing")
    os.makedirs(scratch, exist_ok=True)
    log_path = os.path.join(scratch, "run.log")
    before = cpu_times()
    wall = run([f"--workdir={work}", f"--config.data.root={data}"], log_path)
    steal = steal_share(before, cpu_times())
    lines = stamps(log_path)
    config = json.load(open(os.path.join(work, "config.json")))
    results = json.load(open(os.path.join(work, "results.json")))
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    t_start = lines[0][0]
    theta0_start = first(lines, r"making θ0")
    theta0_end = first(lines, r"θ0 from cache")
    decoded = (re.search(r"decoded \d+ images .* in ([\d.]+)s$", line) for _, line in lines)
    decode_seconds = sum(float(m[1]) for m in decoded if m)
    end = lines[-1][0]
    theta0_work = glob.glob(os.path.join(data, "theta0-*.work"))[0]
    waits = {
        "theta0": data_wait(
            os.path.join(theta0_work, "metrics.jsonl"), config["theta0"]["batch_size"]
        ),
        "stream": data_wait(os.path.join(work, "metrics.jsonl"), config["batch_size"]),
    }
    logged = sum(w["logged_seconds"] for w in waits.values())
    overall = {
        key: sum(w[key] * w["logged_seconds"] for w in waits.values()) / logged
        for key in ("share", "idle_share")
    }
    stages = {
        "before the first log line (interpreter, imports)": wall - (end - t_start),
        "data generation (fif_synth.generate)": manifest["seconds"],
        "decoding training images into memory": decode_seconds,
        "θ0 (pretraining job)": theta0_end - theta0_start,
        "stream (tasks, checkpoints, evaluations)": end - theta0_end,
    }
    report = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "job": "python run.py --workdir=W --config.data.root=D (both empty)",
        "hardware": hardware(),
        "wall_seconds": wall,
        "cpu_steal_share": steal,
        "stages_seconds": stages,
        "data_wait": dict(waits, overall=overall),
        "theta0": {k: config["theta0"][k] for k in ("steps", "batch_size", "lr")},
        "trajectory": results["trajectory"],
        "final": results["final"],
    }
    if not args.no_replay_check:
        no_replay = os.path.join(scratch, "no_replay")
        report["no_replay_wall_seconds"] = run(
            [
                f"--workdir={no_replay}",
                f"--config.data.root={data}",
                '--config.mixture={"pretraining": 0, "update": 1, "buffer": 0}',
            ],  # fmt: skip
            os.path.join(scratch, "no_replay.log"),
        )
        report["no_replay_final"] = json.load(open(os.path.join(no_replay, "results.json")))[
            "final"
        ]
    traj, final = report["trajectory"], report["final"]
    effects = {
        "A_KA rises": final["knowledge_accumulation"] > traj[0]["knowledge_accumulation"] + 10,
        "A_ZS falls": final["zero_shot_retention"] < traj[0]["zero_shot_retention"] - 1,
    }
    if "no_replay_final" in report:
        effects["replay matters (A_ZS without replay lower by > 5)"] = (
            report["no_replay_final"]["zero_shot_retention"] < final["zero_shot_retention"] - 5
        )
    report["effects"] = effects
    write_report(args.out, report, markdown(report))


def markdown(r) -> str:
    hw = r["hardware"]
    w = r["data_wait"]
    lines = [
        f"# The default job on a small machine ({r['date']})",
        "",
        f"Hardware: CPU {hw['cpu']} x {hw['cpu_count']} cores, no accelerator; jax {hw['jax']}.  ",
        f"Command: `{r['command']}` (it runs `{r['job']}`).",
        "",
        f"**Wall time: {r['wall_seconds']:.0f} s** ({r['wall_seconds'] / 60:.1f} min); "
        f"**Data wait: {100 * w['overall']['idle_share']:.1f}% idle** of the training loops' "
        f"logged time (θ0 {100 * w['theta0']['idle_share']:.1f}%, stream "
        f"{100 * w['stream']['idle_share']:.1f}%): waits for a batch with no step left running "
        "(`data_wait_idle_fraction`, an upper bound). In all, the loop spent "
        f"{100 * w['overall']['share']:.1f}% of its time getting batches (θ0 "
        f"{100 * w['theta0']['share']:.1f}%, stream {100 * w['stream']['share']:.1f}%), mostly "
        "while earlier steps still ran (steps are dispatched asynchronously); what the pipeline "
        "costs the loop's throughput: `results/input_bound_cpu.md`. "
        f"θ0: {r['theta0']['steps']} steps of batch {r['theta0']['batch_size']}. CPU steal "
        f"(time the VM's host gave to other guests) during the run: "
        f"{100 * r['cpu_steal_share']:.1f}%.",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["stages_seconds"].items()]
    lines += [
        "",
        "| evaluation | A_KA | A_ZS | GM |",
        "|---|---|---|---|",
        _row("θ0 (full test sets)", r["trajectory"][0]),
    ]
    lines += [_row(f"after task {i} (subset)", t) for i, t in enumerate(r["trajectory"][1:])]
    lines.append(_row("final (full test sets)", r["final"]))
    if "no_replay_final" in r:
        lines.append(
            _row(
                f"final without replay, 0/1/0 ({r['no_replay_wall_seconds']:.0f} s, θ0 cached)",
                r["no_replay_final"],
            )  # fmt: skip
        )
    lines += ["", "| effect | holds |", "|---|---|"]
    lines += [f"| {k} | {'yes' if v else '**no**'} |" for k, v in r["effects"].items()]
    return "\n".join(lines) + "\n"


def _row(name, s) -> str:
    return (f"| {name} | {s['knowledge_accumulation']:.2f} | {s['zero_shot_retention']:.2f} | "
            f"{s['geometric_mean']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
