"""`compare_runs`: runs made separately in one table and two figures."""

import json
import shutil

import numpy as np
import pytest
from matplotlib import image as mpimg

from fomo_jax.configs import fif_synth as fif_synth_config
from fomo_jax.continual import compare, runner
from fomo_jax.families import clip

KEYS = clip.METRIC_KEYS
SCHEDULES = ("warmup_cosine", "constant")


@pytest.fixture(scope="module")
def two_runs(smoke_data_root, tmp_path_factory):
    """Two finished smoke runs that differ in their schedule (used by one test only, so that
    pytest-xdist makes them once, not once per worker)."""
    runs = []
    for schedule in SCHEDULES:
        config = fif_synth_config.get_config("smoke")
        config.data.root = smoke_data_root
        config.schedule.name = schedule
        workdir = tmp_path_factory.mktemp("runs") / schedule
        runner.run(config, str(workdir))
        runs.append(workdir)
    return runs


def _results(run):
    return json.loads((run / "results.json").read_text())


def _is_a_figure(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(path)[..., :3]
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # drawn, not blank


def test_two_runs_in_one_table_and_two_figures(two_runs, tmp_path, capsys):
    out = tmp_path / "compare"
    comparison = compare.compare_runs([str(r) for r in two_runs], str(out))
    assert json.loads((out / "comparison.json").read_text()) == comparison
    assert list(comparison["runs"]) == list(SCHEDULES)  # named by their folders
    table = (out / "comparison.md").read_text()
    assert table.strip() in capsys.readouterr().out
    for run, schedule in zip(two_runs, SCHEDULES, strict=True):
        results, row = _results(run), comparison["runs"][schedule]
        assert row["final"] == {k: results["final"][k] for k in KEYS}
        assert row["area_under_trajectory"] == results["area_under_trajectory"]
        assert row["steps_per_task"] == results["steps_per_task"] == 6
        assert row["schedule"] == schedule and row["method"] == "finetune"
        final = " | ".join(f"{results['final'][k]:.2f}" for k in KEYS)
        area = " | ".join(f"{results['area_under_trajectory'][k]:.2f}" for k in KEYS)
        assert f"| {schedule} | finetune | {schedule} | 2 | 6 | {final} | {area} |" in table
    assert comparison["notes"] == []  # same datasets, same stream
    assert comparison["runs"]["constant"]["final"] != comparison["runs"]["warmup_cosine"]["final"]
    for figure in ("trajectories.png", "per_dataset.png"):
        _is_a_figure(out / figure)


# The checks below need results.json and config.json only: small hand-made ones, with scores
# chosen here, keep them fast and independent of training.
ADAPTATION = ["synth_counting", "synth_glyphs", "synth_letters", "synth_textures"]
EVALUATION = ["synth_colors", "synth_objects", "synth_objects_page", "synth_pairs", "synth_shapes"]


def _summary(scores, names):
    """A_KA, A_ZS, GM of {dataset: score} computed here, with numpy, for `names`."""
    ka = float(np.mean([scores[n] for n in names if n in ADAPTATION]))
    zs = float(np.mean([scores[n] for n in names if n in EVALUATION]))
    return dict(knowledge_accumulation=ka, zero_shot_retention=zs, geometric_mean=np.sqrt(ka * zs))


def _area(values):
    """Trapezoids over equally spaced points, per interval (the runner's normalization)."""
    values = np.asarray(values)
    return float(np.sum((values[1:] + values[:-1]) / 2) / (len(values) - 1))


def _entry(name, score):
    if name == "synth_pairs":  # retrieval: R@5 is its score
        return {"recall@1": score / 2, "recall@5": score}
    return {"accuracy": score}


def _fake_run(directory, seed, datasets=ADAPTATION + EVALUATION, edit_config=None):
    """A finished run's two JSON files: zero-shot, two task points and the final, with random
    scores over `datasets`; returns the scores ({point: {dataset: score}})."""
    rng = np.random.default_rng(seed)
    points = [{n: float(rng.uniform(0, 100)) for n in datasets} for _ in range(4)]
    summaries = [_summary(p, datasets) for p in points]
    results = dict(
        final=summaries[-1],
        trajectory=summaries[:-1],
        area_under_trajectory={k: _area([s[k] for s in summaries[:-1]]) for k in KEYS},
        per_dataset=dict(
            zero_shot_full={n: _entry(n, v) for n, v in points[0].items()},
            tasks_subset=[{n: _entry(n, v) for n, v in p.items()} for p in points[1:3]],
            final_full={n: _entry(n, v) for n, v in points[3].items()},
        ),
        steps_per_task=6,
    )
    config = json.loads(fif_synth_config.get_config("smoke").to_json_best_effort())
    if edit_config:
        edit_config(config)
    directory.mkdir(parents=True)
    (directory / "results.json").write_text(json.dumps(results))
    (directory / "config.json").write_text(json.dumps(config))
    return points


def test_different_dataset_sets_are_compared_on_the_shared_ones(tmp_path):
    full = _fake_run(tmp_path / "full", seed=0)
    shared = sorted(set(ADAPTATION + EVALUATION) - {"synth_pairs"})
    fewer = _fake_run(tmp_path / "fewer", seed=1, datasets=shared)
    comparison = compare.compare_runs([str(tmp_path / "full"), str(tmp_path / "fewer")],
                                      str(tmp_path / "out"))  # fmt: skip
    assert comparison["datasets"] == shared
    assert comparison["notes"] == [
        "Compared on the 8 datasets all runs share; metrics are recomputed from their "
        "per-dataset scores.",
        "Run full also has 1: synth_pairs.",
    ]
    table = (tmp_path / "out" / "comparison.md").read_text()
    assert all(note in table for note in comparison["notes"])
    for name, points in (("full", full), ("fewer", fewer)):
        row = comparison["runs"][name]
        for key, value in _summary(points[3], shared).items():
            assert row["final"][key] == pytest.approx(value, abs=1e-9), (name, key)
        curve = [_summary(p, shared) for p in points[:3]]  # zero-shot, after task 0, 1
        for key in KEYS:
            area = _area([c[key] for c in curve])
            assert row["area_under_trajectory"][key] == pytest.approx(area, abs=1e-9)
        assert row["per_dataset_final"] == pytest.approx({n: points[3][n] for n in shared})
    for figure in ("trajectories.png", "per_dataset.png"):
        _is_a_figure(tmp_path / "out" / figure)


def test_a_different_stream_is_flagged_and_same_folder_names_are_told_apart(tmp_path):
    def other_stream(config):
        config["data"]["stream"] = "/elsewhere/random_sequence_2.json"
        config["num_tasks"] = 4

    _fake_run(tmp_path / "a" / "run", seed=0)
    _fake_run(tmp_path / "b" / "run", seed=1, edit_config=other_stream)
    comparison = compare.compare_runs([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")],
                                      str(tmp_path / "out"))  # fmt: skip
    assert list(comparison["runs"]) == ["a/run", "b/run"]
    assert comparison["notes"] == [
        "Run b/run has a different stream from a/run: "
        "stream random_sequence_2.json vs random_sequence_1.json; num_tasks 4 vs 2."
    ]


def test_unfinished_or_foreign_runs_are_named(tmp_path):
    _fake_run(tmp_path / "done", seed=0)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(tmp_path / "done" / "config.json", unfinished / "config.json")
    with pytest.raises(FileNotFoundError, match=f"{unfinished / 'results.json'} is missing"):
        compare.compare_runs([str(tmp_path / "done"), str(unfinished)], str(tmp_path / "out"))
    foreign = tmp_path / "pretraining"
    foreign.mkdir()
    shutil.copy(tmp_path / "done" / "config.json", foreign / "config.json")
    (foreign / "results.json").write_text(json.dumps({"final": {}}))
    with pytest.raises(ValueError, match=r"no \['per_dataset', 'trajectory'\]: not a continual"):
        compare.compare_runs([str(foreign)], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="given more than once"):
        compare.compare_runs([str(tmp_path / "done"), str(tmp_path / "done") + "/"],
                             str(tmp_path / "out"))  # fmt: skip
    assert not (tmp_path / "out").exists()
