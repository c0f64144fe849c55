"""Multi-process runs on localhost: 2 processes x 2 fake CPU devices, `jax.distributed` over
loopback (gloo), parameters sharded across the processes (data=1, fsdp=4), against the same run
as 1 process x 4 devices; killed mid-task and resumed on the other mesh; SIGTERM to one process
stopping both at one step (on a hybrid mesh: data across the processes, fsdp within); the CLIP
pretraining job.

Budget: about 4 minutes on 2 cores, serially in one pytest worker (smoke runs of 2 tasks x 6
steps, the SIGTERM run 2 x 30; θ0 is made once by the multi-process run and reused)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from fomo_jax import runtime
from fomo_jax.data import fif, fif_synth

RUN = os.path.join(runtime.REPO_ROOT, "run.py")
FSDP = ["--config.mesh.data=1", "--config.mesh.fsdp=4"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(root, workdir, method, *extra):
    return [sys.executable, RUN, "--config=configs/fif_synth.py:smoke",
            f"--config.data.root={root}", f"--config.method={method}", f"--workdir={workdir}",
            *FSDP, *extra]  # fmt: skip


def _env(devices):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def _single(root, workdir, method, *extra):
    """1 process x 4 devices."""
    result = subprocess.run(_args(root, workdir, method, *extra), cwd=runtime.REPO_ROOT,
                            env=_env(4), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _start_pair(root, workdir, method, *extra):
    """2 processes x 2 devices: the Popen objects and their log files."""
    port = _port()
    processes, logs = [], []
    for i in range(2):
        log = open(f"{workdir}.p{i}.log", "w")
        args = _args(root, workdir, method, *extra) + [
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        ]
        processes.append(subprocess.Popen(args, cwd=runtime.REPO_ROOT, env=_env(2),
                                          stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
        logs.append(log)
    return processes, logs


def _pair(root, workdir, method, *extra):
    processes, logs = _start_pair(root, workdir, method, *extra)
    for p in processes:
        p.wait(timeout=600)
    for log in logs:
        log.close()
    texts = [open(f"{workdir}.p{i}.log").read() for i in range(2)]
    for p, text in zip(processes, texts, strict=True):
        assert p.returncode == 0, text[-4000:]
    return texts


def _losses(workdir):
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(x["task"], x["step"]) for x in lines], np.array([x["loss"] for x in lines])


def _test_sizes(root) -> dict:
    """{dataset: images in its test split}: one example is 100 / n points of its score."""
    datasets = fif_synth.load_datasets(root)
    return {k: len(fif.load_split(root, k, "test", datasets=datasets)) for k in datasets}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fif_synth_smoke_multihost"))


@pytest.fixture(scope="module")
def pair_runs(root, tmp_path_factory):
    """finetune and ema_merge as 2 processes (θ0 made by the first, multi-process too)."""
    base = tmp_path_factory.mktemp("multihost")
    out = {}
    for method in ("finetune", "ema_merge"):
        out[method] = (base / f"pair_{method}", _pair(root, base / f"pair_{method}", method))
    return out


@pytest.mark.parametrize("method", ["finetune", "ema_merge"])
def test_two_processes_match_one(method, root, pair_runs, tmp_path):
    pair, logs = pair_runs[method]
    single = tmp_path / "single"
    _single(root, single, method)
    # One line per logged (task, step), written by process 0 only; the same losses.
    keys, got = _losses(pair)
    want_keys, want = _losses(single)
    assert keys == want_keys and len(set(keys)) == len(keys)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # The final zero-shot scores within one test example of each dataset.
    got_final = json.loads((pair / "results.json").read_text())
    want_final = json.loads((single / "results.json").read_text())
    sizes = _test_sizes(root)
    for name, scores in want_final["per_dataset"]["final_full"].items():
        for metric, value in scores.items():
            got_value = got_final["per_dataset"]["final_full"][name][metric]
            assert abs(got_value - value) <= 100.0 / sizes[name] + 1e-6, (name, metric)
    # Each process loaded only its share of each global batch of 16.
    assert ("mesh data=1 x fsdp=4 x model=1 on 2 processes: fsdp crosses processes; data, "
            "model stay within one") in logs[0]  # fmt: skip
    assert "process 0 loads rows 0-7 of every global batch of 16" in logs[0]
    assert "process 1 loads rows 8-15 of every global batch of 16" in logs[1]
    # Evaluation: each process decoded half of every test set (to files on disk) and feeds its
    # half of every evaluation batch of 64.
    for name, n in sizes.items():
        assert f"test set {name}: process 0 decodes rows 0-{n // 2 - 1} of {n}" in logs[0]
        assert f"test set {name}: process 1 decodes rows {n // 2}-{n - 1} of {n}" in logs[1]
    assert "evaluation: process 1 feeds rows 32-63 of every batch of 64" in logs[1]
    assert len(os.listdir(pair / "eval_images")) == 3 * len(sizes)  # .npy, .done, .lock


def test_killed_pair_resumes_on_one_process_only_with_the_switch(root, pair_runs, tmp_path):
    reference = pair_runs["finetune"][0]
    workdir = tmp_path / "killed"
    processes, logs = _start_pair(root, workdir, "finetune")
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "8").exists():  # task 1, mid-task
        assert all(p.poll() is None for p in processes) and time.time() < deadline
        time.sleep(0.05)
    for p in processes:
        p.send_signal(signal.SIGKILL)
        p.wait()
    for log in logs:
        log.close()
    assert not (workdir / "results.json").exists()
    refused = subprocess.run(_args(root, workdir, "finetune"), cwd=runtime.REPO_ROOT,
                             env=_env(4), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert refused.returncode != 0
    assert "set config.resume_on_new_mesh=True" in refused.stderr
    result = _single(root, workdir, "finetune", "--config.resume_on_new_mesh=True")
    assert "resuming from checkpoint 8" in result.stderr
    got = json.loads((workdir / "results.json").read_text())
    want = json.loads((reference / "results.json").read_text())
    for key in ("knowledge_accumulation", "zero_shot_retention"):
        assert abs(got["final"][key] - want["final"][key]) <= 1.0, key
    from safetensors.numpy import load_file

    a = load_file(str(workdir / "model" / "model.safetensors"))
    b = load_file(str(reference / "model" / "model.safetensors"))
    # The final parameters, within float32 reduction-order noise: rtol 1e-3, atol 1e-4 (the
    # key-projection biases have no gradient in exact arithmetic and move by rounding alone,
    # ~1e-5 either way).
    for key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-4, err_msg=key)


def test_sigterm_to_one_process_stops_all_at_one_step(root, tmp_path):
    """SIGTERM to process 1 only: both agree on one step (JAX's preemption sync point),
    checkpoint it together and exit with 75; the same command resumes there."""
    workdir = tmp_path / "sigterm"
    longer = ["--config.steps_per_task=30", "--config.checkpoint_every=1000",
              "--config.log_every=1", "--config.mesh.data=2", "--config.mesh.fsdp=2",
              "--config.mesh.dcn_data=2"]  # fmt: skip
    processes, logs = _start_pair(root, workdir, "finetune", *longer)
    metrics, deadline = workdir / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # training
        assert all(p.poll() is None for p in processes) and time.time() < deadline
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)
    for p in processes:
        p.wait(timeout=300)
    for log in logs:
        log.close()
    texts = [open(f"{workdir}.p{i}.log").read() for i in range(2)]
    assert [p.returncode for p in processes] == [75, 75], texts[1][-3000:]
    # A hybrid mesh: data parallel across the two processes, fsdp within each.
    assert ("mesh data=2 x fsdp=2 x model=1 on 2 processes: data crosses processes; fsdp, "
            "model stay within one") in texts[0]  # fmt: skip
    stops = [re.findall(r"SIGTERM: checkpoint (\d+) at task (\d+) step (\d+)", t) for t in texts]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    index, task, step = map(int, stops[0][0])
    assert index == task * 30 + step and 0 < step < 30  # mid-task, not an end-of-task save
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())[-1] == index
    assert not (workdir / "results.json").exists()
    texts = _pair(root, workdir, "finetune", *longer)
    assert f"resuming from checkpoint {index}: task {task}, step {step}" in texts[0]
    assert json.loads((workdir / "results.json").read_text())["final"]


def test_pretraining_job_on_two_processes_matches_one(tmp_path):
    """The CLIP pretraining job (`run --config=clip_synth:smoke`) as 2 processes x 2 devices
    with parameters sharded across them, against 1 process x 4 devices."""
    root = tmp_path / "data"
    args = ["--config=configs/clip_synth.py:smoke", f"--config.data.root={root}", *FSDP]
    single = tmp_path / "single"
    result = subprocess.run([sys.executable, RUN, *args, f"--workdir={single}"],
                            cwd=runtime.REPO_ROOT, env=_env(4), capture_output=True, text=True,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    pair = tmp_path / "pair"
    port = _port()
    processes = [subprocess.Popen([sys.executable, RUN, *args, f"--workdir={pair}",
                                   f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                   f"--process_id={i}"], cwd=runtime.REPO_ROOT, env=_env(2),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]  # fmt: skip
    errors = [p.communicate(timeout=600)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors[0][-4000:]
    keys, got = _losses(pair)
    want_keys, want = _losses(single)
    assert keys == want_keys
    np.testing.assert_allclose(got, want, rtol=1e-4)
    got, want = (json.loads((d / "results.json").read_text()) for d in (pair, single))
    sizes = _test_sizes(str(root))
    for stage in ("zero_shot_before", "zero_shot_after"):
        for name, value in want[stage]["per_dataset"].items():
            assert abs(got[stage]["per_dataset"][name] - value) <= 100.0 / sizes[name] + 1e-6
