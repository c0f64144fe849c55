"""The continual VLM stream end to end (`configs/vlm_synth.py:smoke`): every θ0 stage built on
an empty data root, the runner over the skills, `results.json` with the four headline metrics;
killed with kill -9 inside a θ0 stage and again inside the stream, the rerun ends bit-identical
to the uninterrupted run. Teacher-forced exact match equals greedy exact match. The recipe's
arms (a stage's rules and method) and the smoke study of `benchmarks/vlm_findings.py`."""

import dataclasses
import glob
import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from fomo_jax import evaluate_vlm, runtime
from fomo_jax import params as params_lib
from fomo_jax.configs import vlm_synth as vlm_synth_config
from fomo_jax.data import vlm_stream, vlm_synth
from fomo_jax.families import vlm as vlm_family
from tests.continual import processes

RUN = os.path.join(runtime.REPO_ROOT, "run.py")


def _command(root, cache, workdir):
    return [sys.executable, RUN, "--config=configs/vlm_synth.py:smoke",
            f"--config.data.root={root}", f"--config.theta0.cache_dir={cache}",
            f"--workdir={workdir}"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("vlm_stream")
    root = base / "root"  # empty: the world and every θ0 stage are made
    processes.run(_command(root, root, base / "reference"))
    return base, root


def test_smoke_stream_writes_the_four_metrics(reference):
    base, root = reference
    results = json.loads((base / "reference" / "results.json").read_text())
    assert set(results["final"]) == {"knowledge_accumulation", "zero_shot_retention",
                                     "geometric_mean", "text_retention"}  # fmt: skip
    assert len(results["trajectory"]) == 3  # zero-shot, after each of the 2 tasks
    final = results["per_dataset"]["final_full"]
    assert {"count", "reading", "caption", "facts", "facts_cloze", "binding_k0",
            "binding_k4"} <= set(final)  # fmt: skip
    # per-source bookkeeping of each task: the update pool is the task's skill
    first, second = results["batch_sizes"]
    assert "count" in first["sources"] and "reading" not in first["sources"]
    assert second["sources"]["count"]["examples"] > 0  # the buffer replays task 0's skill
    assert sum(s["examples"] for s in second["sources"].values()) == 8 * 4
    stages = sorted(os.path.basename(p).split("-")[0]
                    for p in glob.glob(str(root / "vlm_theta0" / "*.npz")))  # fmt: skip
    assert stages == sorted(vlm_stream.STAGES)
    world = json.loads((root / "world.json").read_text())
    assert world["held_out"] == vlm_synth.World(0).held_out_facts()
    for plot in ("ka_zs_trajectory.png", "metrics.png", "per_dataset.png"):
        assert os.path.exists(base / "reference" / "plots" / plot), plot


def test_eval_command_scores_the_exported_vlm_as_the_run_did(reference, tmp_path):
    """`fomo-jax eval --config=vlm_synth:smoke --model=<run>` on the run's exported model gives
    the run's final evaluation."""
    from fomo_jax.continual import eval_job

    base, root = reference
    config = vlm_synth_config.get_config("smoke")
    config.data.root = str(root)
    record = eval_job.evaluate_model(config, str(base / "reference"), str(tmp_path))
    results = json.loads((base / "reference" / "results.json").read_text())
    for key in evaluate_vlm.METRIC_KEYS:
        assert record[key] == results["final"][key], key
    assert record["per_dataset"] == results["per_dataset"]["final_full"]
    assert json.loads((tmp_path / "eval.json").read_text())["model"].endswith("model")


def test_kill_9_in_a_theta0_stage_and_in_the_stream_resumes_bit_identical(reference):
    base, root = reference
    cache, workdir = base / "cache_b", base / "killed"
    command = _command(root, cache, workdir)
    processes.kill_when(command, str(cache / "vlm_theta0" / "vl-*.work" / "checkpoints" / "2"))
    assert not glob.glob(str(cache / "vlm_theta0" / "vl-*.npz"))  # killed inside the stage
    processes.kill_when(
        command, str(workdir / "checkpoints" / "2")
    )  # and inside the stream's task 0
    assert not (workdir / "results.json").exists()
    result = processes.run(command)
    assert "resuming from checkpoint 2" in result.stderr
    for want in glob.glob(str(root / "vlm_theta0" / "*.npz")):
        got = cache / "vlm_theta0" / os.path.basename(want)
        with np.load(want) as a, np.load(got) as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(b[key], a[key], err_msg=f"{got}: {key}")
    want = json.loads((base / "reference" / "results.json").read_text())
    got = json.loads((workdir / "results.json").read_text())
    for key in ("final", "trajectory", "per_dataset", "batch_sizes"):
        assert got[key] == want[key], key


def test_teacher_forced_exact_match_equals_greedy_exact_match():
    """On evaluation items, the one-forward exact match is greedy decoding's. A random VLM
    whose ⟨eou⟩ output row copies the row of its favourite token (slightly larger) stops after
    answers of various lengths; items get those answers (matches) and altered ones (a word
    more, a word less)."""
    config = vlm_synth_config.get_config("smoke")
    family = vlm_family.FAMILY
    model_config = family.model_config(config)
    tokenizer = vlm_synth.WordTokenizer()
    model = family.init_model(model_config, seed=3)
    graphdef, params = params_lib.split(model)
    params = jax.device_get(params)
    evaluator = evaluate_vlm.Evaluator(
        vlm_synth.World(0), tokenizer, model_config, batch_size=8, max_new_tokens=6,
        items=dict(colour=16, shape=8, position=8, caption=2, facts=2), skills=(),
    )  # fmt: skip
    items = evaluator.items["colour"] + evaluator.items["shape"]
    head = np.array(params["lm"]["lm_head"]["kernel"])
    tokens = evaluator.greedy_answers(graphdef, params, "colour", items)
    words = [w for text in tokens for w in text.split()]
    favourite = max(set(words), key=words.count)
    eou = vlm_synth.SPECIALS.eou
    head[:, eou] = head[:, tokenizer.ids[favourite]] * 1.01
    params["lm"]["lm_head"]["kernel"] = head
    answers = evaluator.greedy_answers(graphdef, params, "colour", items)
    stopped = {}  # item index -> its greedy answer: words, then the terminator
    for index, answer in enumerate(answers):
        if answer.endswith("<eou>") and answer.count("<") == 1:
            stopped[index] = answer.removesuffix("<eou>").strip()
    assert len({len(a.split()) for a in stopped.values()}) > 1, answers  # several lengths
    cases = []
    for index, answer in stopped.items():
        item = items[index]
        cases.append(dataclasses.replace(item, answer=answer))  # greedy's own answer
        cases.append(dataclasses.replace(item, answer=(answer + " red").strip()))  # one more
        if answer:  # one word less: its prefix is right, the terminator comes too late
            cases.append(dataclasses.replace(item, answer=" ".join(answer.split()[:-1])))
    greedy = evaluator.greedy_answers(graphdef, params, "colour", cases)
    exact, _ = evaluator._batched("colour", cases, graphdef, params)
    want = np.array([g == f"{c.answer} <eou>".strip() for g, c in zip(greedy, cases, strict=True)])
    assert want.any() and not want.all()
    np.testing.assert_array_equal(exact, want)


def test_stream_config_errors_name_the_key():
    config = vlm_synth_config.get_config("smoke")
    family = vlm_family.FAMILY
    model_config = family.model_config(config)
    config.data.skills = ("count", "flying")
    with pytest.raises(ValueError, match="config.data.skills: unknown skill 'flying'"):
        vlm_stream.prepare(config, family, model_config, vlm_synth.WordTokenizer())
    config.data.skills = ("count",)
    with pytest.raises(ValueError, match="config.num_tasks=2 but config.data.skills has 1"):
        vlm_stream.prepare(config, family, model_config, vlm_synth.WordTokenizer())
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.tokenizer = "bytes"
    with pytest.raises(ValueError, match="tokenizer is 'words'"):
        family.tokenizer(bad, model_config)


def test_recipe_arms_and_the_vlm_findings_smoke_study(reference, tmp_path):
    """benchmarks/vlm_findings.py --smoke on finding (c), from the reference's stage caches.
    Its arms set the VL stage's rules and method: with the LM frozen the stage's LM is bitwise
    the connector stage's (so (c) holds at any size); with LoRA on the LM the adapters are
    folded in at the stage's end (plain leaves only) and only LM kernels moved; the image tower
    never moves. Then the table's structure; a rerun reuses the finished arms; a stage method
    that is not a plain training method, or a negative number of steps, is refused before any
    stage is made. (b)'s LM-only control skips VL pretraining (a stage of 0 steps passes its
    weights on) and trains the LM alone on text: its image tower and connector are the
    connector stage's, bit for bit."""
    import shutil

    from fomo_jax import sharding

    sys.path.insert(0, os.path.join(runtime.REPO_ROOT, "benchmarks"))
    import vlm_findings

    base, root = reference
    runs = tmp_path / "runs"
    shutil.copytree(root / "vlm_theta0", runs / "seed_0" / "vlm_theta0")
    argv = ["--smoke", "--findings", "c", "--workdir", str(runs), "--out", str(tmp_path / "table")]
    report = vlm_findings.main(argv)

    smoke = vlm_synth_config.get_config("smoke")
    model_config = vlm_family.FAMILY.model_config(smoke)

    def stage(arm, name):
        config = vlm_findings.arm_config(smoke, vlm_findings.arm_changes(arm, smoke), 0)
        key = vlm_stream.stage_key(config, model_config, name)
        with np.load(runs / "seed_0" / "vlm_theta0" / f"{name}-{key}.npz") as f:
            return {k: f[k] for k in f.files}

    connector = stage("connector_stage", "connector")
    default_vl = stage("vl_mixture", "vl")
    for arm in ("vl_lm_frozen", "vl_lm_lora"):
        vl = stage(arm, "vl")
        assert sorted(vl) == sorted(connector), arm  # no adapter leaves: folded in
        assert any(not np.array_equal(vl[k], default_vl[k]) for k in vl), arm  # its own cache
        moved = [k for k in vl if not np.array_equal(vl[k], connector[k])]
        assert any(k.startswith("connector/") for k in moved), arm
        assert not [k for k in moved if k.startswith("image/")], arm
        lm = [k for k in moved if k.startswith("lm/")]
        if arm == "vl_lm_frozen":
            assert lm == [], lm
        else:  # LoRA's linears moved; norms and embeddings, frozen, did not
            assert lm and all(k.endswith("/kernel") for k in lm), lm

    saved = json.loads((tmp_path / "table.json").read_text())
    assert saved["config"] == "vlm_synth:smoke" and saved["findings"] == report["findings"]
    arms = vlm_findings.FINDINGS["c"][1]
    assert list(saved["arms"]) == arms
    for name, arm in saved["arms"].items():
        assert {"vqa", "text_retention", "scores.facts", "scores.binding_k0"} <= set(arm["mean"])
        # an arm read at the VL stage is scored after the recipe's SFT too
        read_at_vl = vlm_findings.RECIPE_ARMS[name][0] == "vl"
        assert ("after_sft.vqa" in arm["mean"]) is read_at_vl, name
    finding = saved["findings"]["c"]
    assert finding["passes"] is True, finding["numbers"]  # the frozen LM's text is θ0's
    assert (tmp_path / finding["figure"]).stat().st_size > 0
    table = (tmp_path / "table.md").read_text().splitlines()
    assert sum(line.startswith("| (c) LM frozen vs LoRA vs full") for line in table) == 1
    assert sum(line.startswith(tuple(f"| {a} |" for a in arms)) for line in table) == len(arms)
    again = vlm_findings.main(argv)
    assert again["arms"] == report["arms"]  # read back from each arm's eval.json

    control = vlm_findings.recipe_arm(smoke, "lm_text_sft", 0, str(runs))
    assert control["steps"]["vl"] == 0 and control["steps"]["sft"] == 2  # 20% of SFT's 8
    skipped = stage("lm_text_sft", "vl")
    assert skipped.keys() == connector.keys()
    assert all(np.array_equal(skipped[k], connector[k]) for k in connector)
    sft = stage("lm_text_sft", "sft")
    moved = {k.split("/")[0] for k in sft if not np.array_equal(sft[k], connector[k])}
    assert moved == {"lm"}, moved

    smoke.data.root = str(root)
    family = vlm_family.FAMILY.configured(smoke)
    data = vlm_stream.prepare(smoke, family, model_config, vlm_synth.WordTokenizer())
    for key, value, error in (
        ("method", "ewc", r"stages.vl.method='ewc': a stage trains"),
        ("steps", -1, r"stages.vl.steps=-1: 0 \(skip it\) or more"),
    ):
        bad = vlm_findings.arm_config(smoke, {f"theta0.stages.vl.{key}": value}, 0)
        with pytest.raises(ValueError, match=error):
            vlm_stream.load_or_make_theta0(bad, family, model_config, data,
                                           str(tmp_path / "x"), sharding.make_mesh())  # fmt: skip
        assert not (tmp_path / "x").exists()  # refused before any stage is made
