"""The continual runner end to end on the smoke config: outputs, no retracing, exact resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fomo_jax import runtime, schedules
from fomo_jax.configs import fif_synth as fif_synth_config
from fomo_jax.continual import methods, runner
from fomo_jax.continual import workdir as workdir_lib
from fomo_jax.continual.checkpoints import Checkpoints
from fomo_jax.data import mixture, pipeline

RUN = os.path.join(runtime.REPO_ROOT, "run.py")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fif_synth_smoke"))


def _smoke(data_root, **overrides):
    config = fif_synth_config.get_config("smoke")
    config.data.root = data_root
    for key, value in overrides.items():
        config[key] = value
    return config


def _command(data_root, workdir):
    return [sys.executable, RUN, "--config=configs/fif_synth.py:smoke",
            f"--config.data.root={data_root}", f"--workdir={workdir}"]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = subprocess.run(_command(data_root, workdir), cwd=runtime.REPO_ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, result


def test_outputs_and_final_table(uninterrupted):
    workdir, result = uninterrupted
    results = json.loads((workdir / "results.json").read_text())
    keys = {"knowledge_accumulation", "zero_shot_retention", "geometric_mean"}
    assert set(results["final"]) == keys
    assert len(results["trajectory"]) == 1 + 2  # zero-shot + one point per task
    assert [p["evaluation"] for p in results["trajectory"]] == ["full", "subset", "subset"]
    for point in results["trajectory"] + [results["final"]]:
        assert keys <= set(point) and all(0 <= point[k] <= 100 for k in keys)
    assert results["batch_sizes"][0] == {"pretraining": 8, "update": 8, "buffer": 0}
    assert results["batch_sizes"][1] == {"pretraining": 6, "update": 5, "buffer": 5}
    assert "A_KA" in result.stdout and "final (full)" in result.stdout
    for plot in ("ka_zs_trajectory.png", "per_dataset.png", "metrics.png", "learning_rate.png"):
        assert (workdir / "plots" / plot).stat().st_size > 1000
    # The exported model carries the run's tokenizer (here the byte tokenizer's tokenizer.json).
    from fomo_jax.tokenizer import ByteTokenizer, load_tokenizer

    assert isinstance(load_tokenizer(str(workdir / "model")), ByteTokenizer)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [(r["task"], r["step"]) for r in map(json.loads, lines)] == [
        (0, 3),
        (0, 6),
        (1, 3),
        (1, 6),
    ]


def test_kill_and_resume_is_bitwise_identical(data_root, uninterrupted, tmp_path):
    reference, _ = uninterrupted
    workdir = tmp_path / "killed"
    process = subprocess.Popen(_command(data_root, workdir), cwd=runtime.REPO_ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "4").exists():  # the second mid-task checkpoint
        assert process.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.02)
    # The live run holds the work directory's lock, and says who holds it.
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"pid {process.pid}"):
        with workdir_lib.locked(str(workdir)):
            pass
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (workdir / "results.json").exists()  # killed mid-run
    # What a save killed before its rename leaves behind; the rerun removes it.
    leftover = workdir / "checkpoints" / "3.orbax-checkpoint-tmp-1764650000000000"
    leftover.mkdir()
    (leftover / "partial").write_bytes(b"x")
    result = subprocess.run(_command(data_root, workdir), cwd=runtime.REPO_ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]  # the dead run's lock is gone
    assert "resuming from checkpoint" in result.stderr
    assert not leftover.exists()
    got = json.loads((workdir / "results.json").read_text())
    want = json.loads((reference / "results.json").read_text())
    assert got["final"] == want["final"] and got["trajectory"] == want["trajectory"]
    assert got["per_dataset"] == want["per_dataset"]
    for name in os.listdir(reference / "model"):  # final parameters, bit for bit
        assert (workdir / "model" / name).read_bytes() == (reference / "model" / name).read_bytes()
    lines = lambda d: [{k: v for k, v in json.loads(x).items()  # noqa: E731
                        if k not in ("samples_per_second", "data_wait_fraction",
                                     "data_wait_idle_fraction")}
                       for x in (d / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert lines(workdir) == lines(reference)
    # TensorBoard shows each step once, as in the uninterrupted run: what the killed process
    # logged after its checkpoint is purged.
    for run in ("train", "eval"):
        got_board = [x for x in _tensorboard_scalars(workdir, run) if "per_second" not in x[0]
                     and "data_wait" not in x[0]]  # fmt: skip
        want_board = [x for x in _tensorboard_scalars(reference, run) if "per_second" not in x[0]
                      and "data_wait" not in x[0]]  # fmt: skip
        assert got_board == want_board


def test_finished_run_changes_nothing(data_root, uninterrupted):
    workdir, _ = uninterrupted
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    result = subprocess.run(_command(data_root, workdir), cwd=runtime.REPO_ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == before


class _TracedOnce(methods.Method):
    """Fine-tuning whose loss hook fails if the step is traced a second time."""

    name = "traced_once"

    @chex.assert_max_traces(n=1)
    def loss(self, params, state, batch, forward, key):
        return super().loss(params, state, batch, forward, key)


def test_step_is_traced_once_for_the_whole_stream(data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "traced_once", _TracedOnce)
    config = _smoke(data_root, method="traced_once")
    config.methods["traced_once"] = {}
    chex.clear_trace_counter()
    results = runner.run(config, str(tmp_path / "run"))  # 2 tasks, a new schedule per task
    assert len(results["trajectory"]) == 3


def test_config_mistakes_stop_before_compute(data_root, tmp_path):
    config = _smoke(data_root)
    config.mixture.update = 0.5  # ratios no longer sum to 1
    with pytest.raises(ValueError, match="sum to 1"):
        runner.run(config, str(tmp_path / "bad"))
    config = _smoke(data_root, method="no_such_method")
    with pytest.raises(ValueError, match="no_such_method"):
        runner.run(config, str(tmp_path / "bad2"))


def test_required_paths_and_optional_wandb(data_root, tmp_path):
    from fomo_jax.configs import fif as fif_config

    with pytest.raises(ValueError, match="config.data.root is required"):
        runner.run(fif_config.get_config(), str(tmp_path / "fif"))
    config = _smoke(data_root)
    config.wandb.enabled = True
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install wandb"):
            runner.run(config, str(tmp_path / "wandb"))


def _tensorboard_scalars(workdir, run):
    """[(tag, step, value)] of one TensorBoard run as TensorBoard shows it: event files in
    order, and a SessionLog START at step s hides every earlier event of the run with step >= s
    (TensorBoard's purge of orphaned data)."""
    from tensorboardX.proto import event_pb2

    scalars = []
    for path in sorted((workdir / "tensorboard" / run).iterdir()):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):  # TFRecord framing: length, crc, payload, crc
            length = int.from_bytes(data[offset : offset + 8], "little")
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.session_log.status == event_pb2.SessionLog.START:
                scalars = [x for x in scalars if x[1] < event.step]
            scalars += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    return scalars


def test_tensorboard_events_hold_training_and_evaluation(uninterrupted):
    workdir, _ = uninterrupted
    train = _tensorboard_scalars(workdir, "train")
    evaluations = _tensorboard_scalars(workdir, "eval")
    assert {"train/loss", "train/learning_rate"} <= {tag for tag, _, _ in train}
    assert sorted(step for tag, step, _ in train if tag == "train/loss") == [3, 6, 9, 12]
    for tag in ("eval/knowledge_accumulation", "eval/zero_shot_retention"):
        assert [step for t, step, _ in evaluations if t == tag] == [0, 1, 2]


RESTORE_ON_4_DEVICES = """
import dataclasses, sys
import jax, numpy as np
from fomo_jax import models, sharding
from fomo_jax import params as params_lib
from fomo_jax.continual.checkpoints import Checkpoints
from fomo_jax.data import mixture
from fomo_jax.train.step import TrainState, shardings_of
from fomo_jax.models.clip import abstract_clip
rules = sharding.CLIP_RULES
from fomo_jax.train import optimizer
cfg = models.get_config("tiny")
cfg = cfg.replace(text=dataclasses.replace(cfg.text, context_length=48))
params = params_lib.split(abstract_clip(cfg))[1]
tx = optimizer.adamw()
key = jax.random.key_data(jax.random.key(0))
abstract = jax.eval_shape(lambda p: TrainState(np.int32(0), p, tx.init(p), {}, key), params)
ckpt = Checkpoints(sys.argv[1] + "/checkpoints")
index = ckpt.latest()
one = sharding.make_mesh(devices=jax.devices()[:1])
four = sharding.make_mesh(data=2, model=2)
single, _, _ = ckpt.restore(index, abstract, shardings_of(abstract, one, rules))
spread, position, _ = ckpt.restore(index, abstract, shardings_of(abstract, four, rules))
leaf = spread.params["image"]["transformer"]["resblocks"][0]["mlp"]["c_fc"]["kernel"]
assert len(leaf.sharding.device_set) == 4, leaf.sharding
a = params_lib.flatten(jax.device_get(spread.params))
b = params_lib.flatten(jax.device_get(single.params))
assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
print("restored", len(a), "leaves on", len(jax.devices()), "devices; task", position["task"])
"""


def test_checkpoint_restores_onto_another_mesh(uninterrupted):
    workdir, _ = uninterrupted
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=runtime.REPO_ROOT)  # fmt: skip
    result = subprocess.run([sys.executable, "-c", RESTORE_ON_4_DEVICES, str(workdir)],
                            capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "on 4 devices; task 2" in result.stdout


def test_trainable_rules_freeze_parameters(data_root, tmp_path):
    """`config.trainable`: ordered (regex, label) rules replace the method's own choice."""
    import numpy as np

    from fomo_jax import models
    from fomo_jax import params as params_lib

    config = _smoke(data_root)
    config.trainable = ((r"^image/", "frozen"), (r".", "full"))
    runner.run(config, str(tmp_path / "frozen"))
    reference = _smoke(data_root)
    runner.run(reference, str(tmp_path / "plain"))
    frozen = params_lib.flatten(
        params_lib.split(models.load_pretrained(tmp_path / "frozen" / "model"))[1]
    )
    plain = params_lib.flatten(
        params_lib.split(models.load_pretrained(tmp_path / "plain" / "model"))[1]
    )
    theta0 = params_lib.flatten(jax_theta0(config))
    for key in theta0:
        if key.startswith("image/"):
            np.testing.assert_array_equal(np.asarray(frozen[key]), theta0[key], err_msg=key)
    assert any(
        not np.array_equal(np.asarray(plain[k]), theta0[k])
        for k in theta0
        if k.startswith("image/")
    )
    assert any(
        not np.array_equal(np.asarray(frozen[k]), theta0[k])
        for k in theta0
        if k.startswith("text/")
    )


def jax_theta0(config):
    import glob

    import numpy as np

    from fomo_jax import params as params_lib

    (path,) = glob.glob(os.path.join(config.data.root, "theta0-*.npz"))
    with np.load(path) as f:
        return params_lib.unflatten({k: f[k] for k in f.files})


def test_a_stream_naming_a_dataset_without_training_data_stops_early(data_root, tmp_path):
    runner.prepare_data(_smoke(data_root))  # make sure the data exists
    stream = tmp_path / "stream.json"
    stream.write_text(json.dumps(["SYNTH_GLYPHS+++star", "SYNTH_OBJECTS+++red disk"]))
    config = _smoke(data_root)
    config.data.stream = str(stream)
    with pytest.raises(ValueError, match="synth_objects"):
        runner.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training


def test_pretraining_pool_from_arrayrecord_shards(data_root, tmp_path):
    from fomo_jax.data import records, webdataset

    pool = webdataset.WebDatasetSource(os.path.join(data_root, "pretraining"))
    items = [pool[i] for i in range(len(pool))]
    source = records.Source(
        items=items,
        adapter=lambda i, x: records.Example(
            image=x["image"],
            captions=[x["text"]],
            target=0,
            classname=None,
            dataset="pool",
            key=x["key"],
            origin=x["key"],
        ),  # fmt: skip
        description={"kind": "test pool"},
        dataset="pool",
    )
    records.convert(source, str(tmp_path / "pool"), records_per_shard=100, image_size=None)
    config = _smoke(data_root)
    config.data.pretraining_pool = str(tmp_path / "pool")
    config.theta0.cache_dir = str(tmp_path / "theta0")
    data = runner.prepare_data(config)
    assert isinstance(data.pool, pipeline.DecodedSource)  # the smoke config's decode_once
    assert isinstance(data.pool.source, records.RecordSource) and len(data.pool) == len(pool)
    results = runner.run(config, str(tmp_path / "run"))
    assert len(results["trajectory"]) == 3


def test_steps_per_task_from_the_budget(data_root):
    from fomo_jax.train import optimizer

    config = _smoke(data_root, steps_per_task=None, num_tasks=20)
    model_config, _ = runner.model_and_tokenizer(config)
    method = methods.get("finetune")

    def budget(config):
        return runner.task_budget(config, method, model_config, optimizer.adamw())

    info = budget(config)
    assert info["steps_per_task"] == 1420 and info["source"] == "Table 4"  # the paper's budget
    config.budget = "measured"  # fine-tuning measured against itself: the same 28,400 / T
    info = budget(config)
    assert info["steps_per_task"] == 1420 and info["maf"] == info["full_maf"]
    config.n_samples = 1600
    assert budget(config)["steps_per_task"] == 100


def test_equal_compute_scales_the_given_steps_by_the_maf_ratio(data_root):
    from fomo_jax import profiling
    from fomo_jax.families import clip
    from fomo_jax.train import optimizer

    tx = optimizer.adamw()
    config = _smoke(data_root, steps_per_task=200, equal_compute=True)
    model_config, _ = runner.model_and_tokenizer(config)

    def steps(name, **overrides):
        config.method = name
        config.methods[name].update(overrides)
        method = runner.profiling_instance(config, model_config)
        return runner.task_budget(config, method, model_config, tx)

    # Table 4's MAFs (spec §5.2): LoRA r=4 47407.8446, full fine-tuning 63394.7585.
    assert steps("finetune")["steps_per_task"] == 200
    assert steps("lora", rank=4)["steps_per_task"] == int(200 * 63394.7585 / 47407.8446)  # 267
    assert steps("lora", rank=64)["steps_per_task"] == int(200 * 63394.7585 / 47582.8781)  # 266
    with pytest.raises(KeyError, match="not in Table 4"):
        steps("er")  # no published MAF: use the measured budget
    config.steps_per_task = 2  # Table 4: EWC's MAF is 100x fine-tuning's
    with pytest.raises(ValueError, match="ewc .* gets no step of 2"):
        steps("ewc")
    config.steps_per_task = 200
    config.budget = "measured"
    locked = steps("locked_image")
    assert locked["maf"] < locked["full_maf"] and locked["steps_per_task"] > 200
    assert locked["steps_per_task"] == int(200 * locked["full_maf"] / locked["maf"])
    # EWC is charged its Fisher pass per step: 98 forward+backward passes at the update-pool
    # batch size of tasks >= 1, on top of a step that costs what fine-tuning's does.
    config.method = "ewc"
    ewc = runner.profiling_instance(config, model_config)
    profile = profiling.profile_method(ewc, model_config, tx, config.batch_size)
    full = profiling.profile_method(runner.profiling_instance(config, model_config, "finetune"),
                                 model_config, tx, config.batch_size)  # fmt: skip
    batch = mixture.pool_batch_sizes(config.batch_size, dict(config.mixture), 1)["update"]
    assert profile["extra_flops"] == 98 * profiling.grad_pass_flops(
        clip.FAMILY, model_config, batch
    )
    assert profile["flops"] == profile["step_flops"] + profile["extra_flops"]
    assert abs(profile["step_flops"] / full["flops"] - 1) < 0.05
    assert steps("ewc")["steps_per_task"] < 200 * full["flops"] / profile["extra_flops"]


@pytest.mark.parametrize("name", schedules.NAMES)
def test_one_flag_selects_any_schedule(name):
    config = fif_synth_config.get_config()
    config.schedule.name = name  # the only change: every other parameter keeps its default
    lr = runner.schedule_of(config, 200)
    assert 0 <= lr(3, 199) <= lr(0, 19) <= config.optimizer.lr * (1 + 1e-12)
    if name not in ("constant", "cosine", "multistep"):  # the warmup schedules
        config.schedule.warmup_steps = 10  # an absolute warmup instead of the 10% default
        assert runner.schedule_of(config, 200)(0, 9) == pytest.approx(config.optimizer.lr)
        assert runner.schedule_of(config, 200)(0, 8) < config.optimizer.lr
    config = fif_synth_config.get_config()
    config.schedule.name = "constant"
    config.schedule.warmup_fraction = 0.2  # does nothing for a constant rate: refused
    with pytest.raises(ValueError, match="does not take"):
        runner.schedule_of(config, 200)


def test_resumed_logger_hides_what_the_killed_process_logged_after_the_checkpoint(tmp_path):
    import ml_collections

    from fomo_jax.continual.logger import RunLogger

    config = ml_collections.ConfigDict({"wandb": {"enabled": False}})
    first = RunLogger(str(tmp_path), config, keep_lines=0, resume_at=None)
    for step in range(1, 7):  # killed after step 6; its checkpoint was at step 3
        first.step({"task": 0, "step": step, "loss": float(step)}, global_step=step)
    first.evaluation({"knowledge_accumulation": 1.0}, 0)
    first.evaluation({"knowledge_accumulation": 2.0}, 1)  # logged after the checkpoint
    first.close()
    resumed = RunLogger(str(tmp_path), config, keep_lines=3, resume_at=(4, 1))
    for step in range(4, 7):
        resumed.step({"task": 0, "step": step, "loss": 10.0 + step}, global_step=step)
    resumed.evaluation({"knowledge_accumulation": 3.0}, 1)
    resumed.close()
    assert _tensorboard_scalars(tmp_path, "train") == [
        ("train/loss", s, v) for s, v in [(1, 1), (2, 2), (3, 3), (4, 14), (5, 15), (6, 16)]
    ]
    assert _tensorboard_scalars(tmp_path, "eval") == [
        ("eval/knowledge_accumulation", 0, 1.0),
        ("eval/knowledge_accumulation", 1, 3.0),
    ]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in lines] == [1, 2, 3, 14, 15, 16]


class _Diverges(methods.Method):
    """Fine-tuning whose loss and gradients turn NaN at its fourth step."""

    name = "diverges"

    def init_state(self, params):
        return {"steps": jnp.zeros((), jnp.int32)}

    def loss(self, params, state, batch, forward, key):
        loss, metrics, outputs = super().loss(params, state, batch, forward, key)
        return loss * jnp.where(state["steps"] >= 3, jnp.nan, 1.0), metrics, outputs

    def step_update(self, state, params, info):
        return {"steps": state["steps"] + 1}, {}


def test_divergence_saves_the_state_aside_and_keeps_the_last_good_checkpoint(
    data_root, tmp_path, monkeypatch
):
    monkeypatch.setitem(methods.METHODS, "diverges", _Diverges)
    config = _smoke(data_root, method="diverges")
    config.methods["diverges"] = {}
    workdir = tmp_path / "run"
    # Smoke config: log every 3 steps, checkpoint every 2. Steps 1-3 are finite (checkpoint at
    # step 2, log at step 3); step 4 is not, and is a checkpoint step: the run stops there
    # instead of checkpointing non-finite weights.
    # A rerun resumes from the last good checkpoint and diverges again, with the same error
    # and a second entry in diverged/.
    for attempt in (1, 2):
        with pytest.raises(FloatingPointError, match=r"task 0: non-finite .* at step 4") as error:
            runner.run(config, str(workdir))
        assert str(workdir / "diverged" / str(attempt)) in str(error.value)
    assert not (workdir / "results.json").exists()
    assert sorted(os.listdir(workdir / "diverged")) == ["1", "2"]
    assert _restored(workdir / "checkpoints") == ((0, 2), True)
    for index in (1, 2):
        assert _restored(workdir / "diverged", index) == ((0, 4), False)


def _restored(directory, index=None):
    """((task, step), every parameter finite) of a checkpoint (default: the latest)."""
    ckpt = Checkpoints(str(directory))
    restored = ckpt.manager.restore(
        ckpt.latest() if index is None else index,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(), position=ocp.args.JsonRestore()),
    )
    ckpt.close()
    leaves = jax.tree_util.tree_leaves(restored.state["params"])
    finite = all(np.isfinite(np.asarray(x)).all() for x in leaves)
    return (restored.position["task"], restored.position["step"]), finite


class _BreaksAtTaskEnd(methods.Method):
    """Fine-tuning whose end-of-task hook makes one parameter NaN."""

    name = "breaks_at_task_end"

    def end_of_task(self, task, params, state):
        return dict(params, logit_scale=params["logit_scale"] * jnp.nan), state


def test_end_of_task_checkpoints_are_checked_for_finite_values(data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.METHODS, "breaks_at_task_end", _BreaksAtTaskEnd)
    config = _smoke(data_root, method="breaks_at_task_end")
    config.methods["breaks_at_task_end"] = {}
    workdir = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="task 0: non-finite parameters .* end-of-task"):
        runner.run(config, str(workdir))
    assert _restored(workdir / "checkpoints") == ((0, 4), True)  # the last in-task checkpoint
    assert _restored(workdir / "diverged") == ((0, 6), False)


HOLD_LOCK = """
import sys, time
from fomo_jax.continual import workdir
with workdir.locked(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_live_run_is_refused_naming_host_and_pid(data_root, tmp_path):
    import socket

    workdir = tmp_path / "busy"
    env = dict(os.environ, PYTHONPATH=runtime.REPO_ROOT)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workdir)], env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir_lib.WorkdirBusy) as error:
            runner.run(_smoke(data_root), str(workdir))
        assert f"host {socket.gethostname()} pid {holder.pid}" in str(error.value)
        assert sorted(os.listdir(workdir)) == [".lock"]  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()
    with workdir_lib.locked(str(workdir)):  # a holder killed with -9 leaves the lock free
        pass


def test_a_failed_start_leaves_the_workdir_reusable(data_root, tmp_path):
    workdir = tmp_path / "run"
    config = _smoke(data_root)
    config.data.stream = str(tmp_path / "no_such_stream.json")  # a data path mistake
    with pytest.raises(FileNotFoundError, match="no_such_stream.json"):
        runner.run(config, str(workdir))
    config = _smoke(data_root)
    config.mesh.data = 2  # one CPU device here
    with pytest.raises(ValueError, match="needs 2 devices"):
        runner.run(config, str(workdir))
    config = _smoke(data_root)
    config.data.bad_images = "ignore"
    with pytest.raises(ValueError, match="config.data.bad_images='ignore'"):
        runner.run(config, str(workdir))
    assert not (workdir / "config.json").exists()
    # A config recorded by an earlier start that made no checkpoint does not bind the folder.
    (workdir / "config.json").write_text('{"seed": 1}')
    results = runner.run(_smoke(data_root), str(workdir))
    assert len(results["trajectory"]) == 3
    assert json.loads((workdir / "config.json").read_text())["seed"] == 0


def test_batch_must_split_over_the_mesh(data_root):
    config = _smoke(data_root)
    mesh = type("Mesh", (), {"shape": {"data": 2, "fsdp": 2, "model": 1}})()
    config.batch_size = 18  # 18 % 4
    with pytest.raises(ValueError, match=r"config.batch_size=18 does not split .* = 4 devices"):
        runner.check_batch_divides(config, mesh)
    config.batch_size, config.theta0.batch_size = 16, 6
    with pytest.raises(ValueError, match=r"config.theta0.batch_size=6"):
        runner.check_batch_divides(config, mesh)
    config.theta0.checkpoint = "/some/model"  # no θ0 pretraining: its batch does not matter
    runner.check_batch_divides(config, mesh)
    config.eval.batch_size = 66  # evaluation batches are split over the mesh too
    with pytest.raises(ValueError, match=r"config.eval.batch_size=66"):
        runner.check_batch_divides(config, mesh)


# ------------------------------------------------ undecodable images, SIGTERM at a step


@pytest.fixture(scope="module")
def corrupted_root(data_root, uninterrupted, tmp_path_factory):
    """A copy of the smoke data (θ0 cache included) with one training JPEG that task 0 draws
    corrupted: its header kept, its data zeroed."""
    import shutil

    from fomo_jax.data import transforms

    root = tmp_path_factory.mktemp("corrupted") / "data"
    shutil.copytree(data_root, root)
    config = _smoke(str(root))
    config.data.decode_once = False  # here only to find the file: its path, not its pixels
    data = runner.prepare_data(config)
    update_ids, _ = mixture.task_pools(data.catalogue, data.tasks, 0)
    sizes = mixture.pool_batch_sizes(config.batch_size, dict(config.mixture), 0)
    first_slot_of_step_3 = 3 * config.batch_size
    batches = pipeline.TaskBatches(
        catalogue=data.catalogue, update_ids=update_ids, buffer_ids=np.zeros(0, np.int64),
        pretraining=data.pool, batch_sizes=sizes, steps=6, seed=config.seed, task=0,
        tokenizer=None, image_size=8,
    )  # fmt: skip
    pool, sample = batches.locate(first_slot_of_step_3)
    assert pool == "update"
    path = data.catalogue[sample]["image"]
    with open(path, "rb") as f:
        original = f.read()
    with open(path, "wb") as f:
        f.write(original[:200] + bytes(len(original) - 200))
    with pytest.raises(transforms.UndecodableImage):
        transforms.decode_rgb(path)
    return str(root), os.path.basename(path)


def _skip_command(root, workdir):
    return _command(root, workdir) + [
        "--config.data.bad_images=skip", "--config.data.max_bad_image_fraction=0.05",
    ]  # fmt: skip


def test_an_undecodable_image_is_named_under_error(corrupted_root, tmp_path):
    root, name = corrupted_root
    with pytest.raises(ValueError, match=rf"update pool, the synth_\w+ train split: .*{name}"):
        runner.run(_smoke(root), str(tmp_path / "error"))
    config = _smoke(root)
    config.data.bad_images = "skip"  # 0.1% of 192 samples: not one
    with pytest.raises(ValueError, match=r"1 undecodable images skipped, more than .*\(0\)"):
        runner.run(config, str(tmp_path / "limit"))


def test_sigterm_checkpoints_the_step_and_skipped_images_resume_exactly(corrupted_root, tmp_path):
    root, _ = corrupted_root
    reference = tmp_path / "reference"
    result = subprocess.run(_skip_command(root, reference), cwd=runtime.REPO_ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    want = json.loads((reference / "results.json").read_text())
    assert want["bad_images"]["skipped"] >= 1 and want["bad_images"]["policy"] == "skip"
    assert "skipping an undecodable image" in result.stderr

    workdir = tmp_path / "preempted"
    log = tmp_path / "preempted.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(_skip_command(root, workdir), cwd=runtime.REPO_ROOT,
                                   stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "2").exists():  # the first mid-task checkpoint
        assert process.poll() is None and time.time() < deadline, "run ended before SIGTERM"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)
    stderr = log.read_text()
    assert process.returncode == workdir_lib.EXIT_PREEMPTED, stderr[-4000:]
    saves, task, step = map(int, re.search(
        r"SIGTERM: checkpoint (\d+) at task (\d+) step (\d+)", stderr).groups())  # fmt: skip
    assert Checkpoints(str(workdir / "checkpoints")).latest() == saves
    assert _restored(workdir / "checkpoints", saves)[0] == (task, step)
    assert not (workdir / "results.json").exists()

    result = subprocess.run(_skip_command(root, workdir), cwd=runtime.REPO_ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resuming from checkpoint {saves}: task {task}, step {step}" in result.stderr
    got = json.loads((workdir / "results.json").read_text())
    for key in ("final", "trajectory", "per_dataset", "bad_images"):
        assert got[key] == want[key], key
    for name in os.listdir(reference / "model"):
        assert (workdir / "model" / name).read_bytes() == (reference / "model" / name).read_bytes()


# ------------------------------------------------ progress lines, W&B axes of a real run


def test_run_progress_counts_remaining_steps_and_evaluations():
    from fomo_jax.continual import loop as loop_lib

    job = loop_lib.Job(workdir="", family=None, method=None, tx=None, mesh=None, steps=100,
                       num_tasks=4, lr_of=None, batches=None, seed=0, log_every=1,
                       after_task=lambda task, params: {}, eval_every_nth_task=2,
                       final_evaluation=True)  # fmt: skip
    loop = loop_lib._Loop(job, None, None, None)
    loop.eval_seconds = job.eval_seconds
    # Task 1, step 60: 160 of 400 steps done; 240 left at 0.5 s = 120 s. Subset evaluations
    # still to come after tasks 1 and 3 (every 2nd task, and the last): 2 x 10 s; the final
    # full evaluation: 100 s. 240 s in all.
    loop.eval_seconds.update(subset=10.0, full=100.0)
    assert loop.run_progress(1, 60, 0.5) == "run 160/400 steps (40%) | ETA run 4m00s"
    # At the last step of task 2 (not evaluated: every 2nd task), 100 steps (50 s), task 3's
    # subset evaluation (10 s) and the final one (100 s) remain.
    assert loop.run_progress(2, 100, 0.5) == "run 300/400 steps (75%) | ETA run 2m40s"
    # Not timed yet (a resumed run before its first evaluation): a lower bound, steps only.
    loop.eval_seconds.clear()
    assert loop.run_progress(1, 60, 0.5) == "run 160/400 steps (40%) | ETA run >2m00s"
    assert [loop_lib.format_duration(s) for s in (0.4, 42, 185, 3599.6, 7620)] == [
        "0s", "42s", "3m05s", "1h00m", "2h07m"
    ]  # fmt: skip


def test_a_run_logs_its_progress_budget_and_wandb_axes(data_root, tmp_path, caplog, monkeypatch):
    import logging

    from fomo_jax import evaluate as evaluate_lib
    from tests.continual.test_logger import FakeWandb

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    # Progress lines at least 100 rows apart (10,000 by default), so the smoke sets show the
    # lines a big set logs as it goes.
    monkeypatch.setattr(evaluate_lib, "PROGRESS_MIN_ROWS", 100)
    config = _smoke(data_root)
    config.wandb.enabled = True
    caplog.set_level(logging.INFO)
    runner.run(config, str(tmp_path / "run"))
    messages = [record.getMessage() for record in caplog.records]
    text = "\n".join(messages)

    # Per log line: the whole stream's steps and ETA. A fresh run has timed both evaluation
    # kinds at zero-shot, so no ETA is a lower bound.
    for task, done, percent in [(0, 3, 25), (0, 6, 50), (1, 3, 75), (1, 6, 100)]:
        pattern = (rf"^task {task} step {done}/6 \|.* \| ETA task \d+s \| "
                   rf"run {6 * task + done}/12 steps \({percent}%\) \| ETA run \d+s$")  # fmt: skip
        assert any(re.match(pattern, m) for m in messages), (pattern, text[-3000:])

    # Evaluation progress: every test set as it is decoded (a set of 200 or more images also
    # while it decodes), every embedding pass as it goes (at most one line per tenth) and
    # when it closes.
    datasets = runner.prepare_data(config).datasets
    for number, key in enumerate(datasets, 1):
        line = rf"^test set {number}/{len(datasets)} {key}: (\d+) images decoded"
        images = int(re.search(line, text, re.M).group(1))
        decoding = re.findall(rf"^decoding the {key} test images: \d+/{images} rows", text, re.M)
        assert bool(decoding) == (images >= 200), key
    retrieval = sum(info.is_retrieval for info in datasets.values())
    for what, count in [("test images (full)", len(datasets)),
                        ("test images (subset)", len(datasets)),
                        ("class prompts", len(datasets) - retrieval),
                        ("test captions (full)", retrieval),
                        ("test captions (subset)", retrieval)]:  # fmt: skip
        closing = rf"^embedding {re.escape(what)}, {count} datasets?: \d+ rows in"
        assert re.search(closing, text, re.M), what
    # The full test images (about 1,260 rows) of the zero-shot and the final evaluations.
    going = re.findall(r"^embedding test images \(full\), \d+ datasets: \d+/\d+ rows \(\d+%\), "
                       r"at synth_\w+ \(\d/\d datasets\)", text, re.M)  # fmt: skip
    assert 2 <= len(going) <= 2 * 9, going
    assert len(re.findall(r"^evaluation \(subset test sets\) took", text, re.M)) == 3
    assert len(re.findall(r"^evaluation \(full test sets\) took", text, re.M)) == 2

    # The start-up budget: the run's own tiny model and steps, not the paper's ViT-B/16 table.
    assert "compute budget of this run" in text and "steps per task  6 (config" in text
    assert "(Table 4)" not in text

    # W&B: training on the global-step axis, evaluations on their own (0 = zero-shot).
    (run,) = fake.runs
    assert [e["global_step"] for e in run.logs if "global_step" in e] == [3, 6, 9, 12]
    assert [e["evaluation_index"] for e in run.logs if "evaluation_index" in e] == [0, 1, 2]
    assert run.axis_of("eval/knowledge_accumulation") == "evaluation_index"
    assert fake.inits[0]["id"] == (tmp_path / "run" / "wandb_id").read_text().strip()
