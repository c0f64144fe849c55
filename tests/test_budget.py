"""The compute budget: Table 4 as printed, the MAF step formula, warmup and the profiler."""

import math

import jax
import jax.numpy as jnp
import pytest

from fomo_jax import budget, profiling
from fomo_jax import params as params_lib
from fomo_jax.families import clip
from fomo_jax.models import get_config
from fomo_jax.models.clip import abstract_clip
from fomo_jax.train import optimizer

FULL = budget.PAPER_TABLE["finetune"]


@pytest.mark.parametrize(
    "key, gflops, memory, mult, maf, steps",
    [
        ("finetune", 63394.7585, 46.5917, 1, 63394.7585, (1420, 568, 284, 142)),
        ("locked_text", 57254.6183, 37.5761, 0.8064, 46170.1241, (1949, 780, 390, 195)),
        ("locked_image", 27176.6698, 11.8847, 0.2551, 6932.7684, (12982, 5193, 2596, 1298)),
        ("bitfit", 43165.5968, 30.5546, 0.6558, 28307.9983, (3179, 1272, 636, 318)),
        ("lora_r64", 54505.0151, 40.6757, 0.873, 47582.8781, (1891, 757, 378, 189)),
        ("vera_r4", 54479.3393, 40.5449, 0.8702, 47407.921, (1898, 759, 380, 190)),
        ("ewc", 6276081.094, 47.207, 1.0132, 6358925.364, (14, 6, 3, 1)),
        ("si", 63394.7585, 46.6523, 1.0013, 63477.1716, (1418, 567, 284, 142)),
    ],
)
def test_table_rows_as_printed(key, gflops, memory, mult, maf, steps):
    row = budget.PAPER_TABLE[key]
    assert (row.gflops, row.memory_gb, row.mult, row.maf) == (gflops, memory, mult, maf)
    assert tuple(row.steps[t] for t in (20, 50, 100, 200)) == steps
    for t, s in zip((20, 50, 100, 200), steps, strict=True):
        assert budget.steps_per_task(key, t) == s


def test_table_has_every_method_and_rank():
    expected = {"finetune", "locked_text", "locked_image", "lnfit", "bitfit", "ewc", "si"}
    expected |= {"zs_merge", "ft_merge", "ema_merge"}
    expected |= {f"{m}_r{r}" for m in ("lora", "dora", "vera") for r in (4, 64)}
    assert set(budget.PAPER_TABLE) == expected
    assert budget.steps_per_task("dora", 100, rank=64) == 377
    assert budget.steps_per_task("dora_r64", 100) == 377


def test_reading_notes_hold_for_the_whole_table():
    """Spec §5.2: T=20 is the formula within ±3, other T round(T_s(20)·20/T) but one cell."""
    off_by_rounding = []
    for row in budget.PAPER_TABLE.values():
        assert row.maf == pytest.approx(row.gflops * row.mult, rel=1e-8)
        assert row.total_steps == row.steps[200] * 200  # not steps[20] * 20
        formula = math.floor(1420 * FULL.maf / row.maf)
        assert abs(budget.budget_steps(20, row.maf, FULL.maf) - formula) == 0
        assert abs(row.steps[20] - formula) <= 3
        for t in (50, 100, 200):
            if row.steps[t] != round(row.steps[20] * 20 / t):
                off_by_rounding.append((row.method, t))
    assert off_by_rounding == [("lora_r64", 50)]


def test_worked_example_lora_r4():
    """1420 × 63394.7585 / 47407.8446 = 1898.9 → 1898."""
    assert budget.budget_steps(20, 47407.8446, 63394.7585) == 1898
    measured = budget.steps_per_task(
        "my_new_lora", 20, budget="measured", measured_maf=47407.8446, full_maf=63394.7585
    )
    assert measured == budget.steps_per_task("lora", 20, rank=4) == 1898


def test_formula_is_exact_at_integer_boundaries():
    # full fine-tuning gets exactly 28,400 / T steps, for any T dividing it
    for t in (1, 20, 50, 71, 100, 200, 400):
        assert budget.budget_steps(t, 63394.7585, 63394.7585) == 28_400 // t
    assert budget.budget_steps(3, 1.0, 1.0) == 9466  # floor(9466.67)


def test_paper_budget_at_other_horizons_uses_table_mafs():
    assert budget.steps_per_task("finetune", 10) == 2840
    assert budget.steps_per_task("lora", 10, rank=4) == math.floor(2840 * FULL.maf / 47407.8446)
    info = budget.task_budget("lora", 10, rank=4)
    assert info["source"] == "formula on Table 4 MAFs" and info["maf"] == 47407.8446


def test_steps_per_task_errors():
    with pytest.raises(KeyError, match='budget="measured"'):
        budget.steps_per_task("my_method", 20)
    with pytest.raises(KeyError, match="lora_r8"):
        budget.steps_per_task("lora", 20, rank=8)
    with pytest.raises(ValueError, match="needs a rank"):
        budget.steps_per_task("lora", 20)
    with pytest.raises(ValueError, match="has no rank"):
        budget.steps_per_task("bitfit", 20, rank=4)
    with pytest.raises(ValueError, match="budget="):
        budget.steps_per_task("finetune", 20, budget="guess")
    with pytest.raises(ValueError, match="measured_maf and full_maf"):
        budget.steps_per_task("finetune", 20, budget="measured", measured_maf=1.0)
    with pytest.raises(ValueError, match="only used"):
        budget.steps_per_task("finetune", 20, measured_maf=1.0, full_maf=1.0)
    with pytest.raises(ValueError, match="num_tasks"):
        budget.steps_per_task("finetune", 0)
    with pytest.raises(ValueError, match="< 1 steps"):
        budget.steps_per_task("ewc", 300)  # 28,400/300 × MAF ratio < 1


def test_samples_and_warmup():
    assert budget.n_samples(1420, 512) == 727_040
    assert budget.n_samples(28_400) == 14_540_800
    cases = {1420: 142, 568: 57, 284: 29, 142: 15, 1898: 190, 12982: 1299, 28400: 2840, 30: 3}
    assert {s: budget.warmup_steps(s) for s in cases} == cases
    info = budget.task_budget("finetune", 20)
    assert (info["steps_per_task"], info["n_samples"], info["warmup_steps"]) == (1420, 727_040, 142)
    assert info["total_steps"] == 28_400 and info["source"] == "Table 4"


def test_format_paper_table():
    text = budget.format_budget_table(budget.budget_table((20, 200), methods=["finetune", "ewc"]))
    lines = text.splitlines()
    assert lines[0].split() == ["method", "GFLOPs/step", "mem", "(GB)", "Mult", "MAF"] + [
        "T=20",
        "T=200",
    ]
    assert lines[2].split() == ["finetune", "63394.7585", "46.5917", "1.0000", "63394.7585"] + [
        "1420",
        "142",
    ]
    assert lines[3].split()[-2:] == ["14", "1"]


# --------------------------------------------------------------------------- profiler

TX = optimizer.adamw()
BATCH = 32


@pytest.fixture(scope="module")
def full_profile():
    return profiling.profile_train_step("tiny", TX, BATCH)


def test_profile_full_step_is_about_three_forward_passes(full_profile):
    """Independent check of the FLOP count: backward ≈ 2× forward, so a step ≈ 3× forward."""
    graphdef, params = params_lib.split(abstract_clip(get_config("tiny")))
    batch = {
        "images": jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.uint8),
        "token_ids": jax.ShapeDtypeStruct((BATCH, 16), jnp.int32),
    }
    loss_fn = clip.FAMILY.loss(graphdef)
    cost = jax.jit(lambda p, b: loss_fn(p, b, None)[0]).lower(params, batch).compile()
    cost = cost.cost_analysis()
    forward = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert full_profile["flops"] > 0
    assert 2.5 <= full_profile["flops"] / forward <= 3.5


def test_profile_memory(full_profile):
    p = full_profile
    # params, two Adam moments and the gradients are all live at once
    assert p["peak_bytes"] > 3 * p["param_bytes"] > 0
    assert p["peak_bytes"] == (
        p["argument_bytes"] + p["output_bytes"] + p["temp_bytes"] - p["alias_bytes"]
    )
    assert p["alias_bytes"] > 0  # the state is donated
    assert p["devices"] == 1 and p["flops"] == p["flops_per_device"]


def test_profile_subset_never_executes(full_profile, monkeypatch):
    """Abstract inputs only, and a host callback in the loss that would fire if it ran."""
    from fomo_jax.configs import fif_synth
    from fomo_jax.continual import methods, runner

    calls = []

    class LockedImageWithCallback(methods.METHODS["locked_image"]):
        def loss(self, params, state, batch, loss_fn, key):
            jax.debug.callback(lambda: calls.append(1))
            return super().loss(params, state, batch, loss_fn, key)

    monkeypatch.setitem(methods.METHODS, "locked_image", LockedImageWithCallback)
    config = fif_synth.get_config("smoke")
    config.method = "locked_image"
    method = runner.profiling_instance(config, get_config("tiny"))
    frozen_image = profiling.profile_method(method, get_config("tiny"), TX, BATCH)
    assert calls == []
    assert frozen_image["trainable_param_bytes"] < frozen_image["param_bytes"]
    assert frozen_image["param_bytes"] == full_profile["param_bytes"]
    # no weight gradients for the image tower, no moments for it
    assert 0 < frozen_image["flops"] < full_profile["flops"]
    assert 0 < frozen_image["peak_bytes"] < full_profile["peak_bytes"]

    m = budget.maf(frozen_image, full_profile)
    assert 0 < m["mult"] < 1 and m["maf"] == pytest.approx(m["gflops"] * m["mult"])
    rows = budget.budget_table(
        (20,), profiles={"finetune": full_profile, "locked_image": frozen_image}
    )
    assert rows[0]["steps"][20] == 1420 and rows[0]["mult"] == 1
    assert rows[1]["steps"][20] == math.floor(1420 / m["maf"] * rows[0]["maf"] + 1e-9)
    assert "measured" in budget.format_budget_table(rows)


def test_profile_accepts_a_built_module(tiny_model, full_profile):
    """A module with real weights is profiled through its shapes: the same compiled step."""
    profile = profiling.profile_train_step(tiny_model, TX, BATCH)
    assert profile["flops"] == full_profile["flops"]
    assert profile["peak_bytes"] == full_profile["peak_bytes"]


def test_a_merge_steps_with_fine_tunings_program_and_keeps_its_state_beside_it(tiny_model):
    """A merge's state (θ0, merged weights) is never read by the step: the merge compiles plain
    fine-tuning's program, its state passes the step untouched (not donated), and its profile
    counts the state once, as resident beside the step."""
    from fomo_jax import sharding
    from fomo_jax.configs import fif_synth
    from fomo_jax.continual import runner
    from fomo_jax.train import step as step_lib

    tiny, mesh, programs, profiles = get_config("tiny"), sharding.make_mesh(), {}, {}
    for name in ("finetune", "zs_merge"):
        config = fif_synth.get_config("smoke")
        config.method = name
        method = runner.profiling_instance(config, tiny)
        profiles[name] = profiling.profile_method(method, tiny, TX, BATCH)
        params = params_lib.split(tiny_model)[1]
        state = step_lib.fresh_state(method.init_params(params), method, TX, step_lib.step_key(0))
        shardings = step_lib.shardings_of(jax.eval_shape(lambda s=state: s), mesh,
                                          clip.FAMILY.rules)  # fmt: skip
        step = step_lib.compile_step(clip.FAMILY, method.graphdef, TX, method, mesh, shardings)
        batch = clip.FAMILY.abstract_batch(tiny, BATCH)
        programs[name] = step.lower(state, batch, 1e-3).as_text()
    assert method.state_in_step is False and programs["zs_merge"] == programs["finetune"]
    state = step_lib.place(state, shardings)
    anchor = jax.tree.leaves(state.method_state)[0]
    batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch.items()}
    new, _ = step(state, batch, 1e-3)
    assert jax.tree.leaves(new.method_state)[0] is anchor and not anchor.is_deleted()
    merge, plain = profiles["zs_merge"], profiles["finetune"]
    assert merge["method_state_bytes"] > 0 and merge["flops"] == plain["flops"]
    assert merge["argument_bytes"] == plain["argument_bytes"]
    assert merge["peak_bytes"] == plain["peak_bytes"] + merge["method_state_bytes"]


# ------------------------------------------------------------- the run's start-up report


def _report(config, model_config=None):
    """(run table as {row: value}, whether Table 4 follows) of the runner's start-up report
    for `config`, computed the way the runner does (no data, nothing compiled)."""
    import re

    from fomo_jax.continual import methods, runner

    model_config = model_config or runner.model_and_tokenizer(config)[0]
    method = methods.get(config.method, config.methods.get(config.method))
    info = runner.task_budget(config, method, model_config, TX)
    text = runner.budget_report(config, info, model_config)
    head, _, paper = text.partition("(Table 4):\n")
    lines = [line.strip() for line in head.splitlines() if line.startswith("  ")]
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines)
    return rows, paper


def _smoke_config(**overrides):
    from fomo_jax.configs import fif_synth

    config = fif_synth.get_config("smoke")
    config.update(overrides)
    return config


def test_smoke_run_reports_its_own_budget_without_the_paper_table():
    rows, paper = _report(_smoke_config())
    assert rows == {
        "model": "tiny",
        "method": "finetune",
        "tasks": "2",
        "steps per task": "6 (config.steps_per_task)",
        "total steps": "12",  # 2 tasks x 6
        "batch size": "16",
        "samples": "96 per task, 192 in all",  # 6 x 16, x 2
        "MAF": "not used (the steps are given)",
    }
    assert paper == ""  # a tiny model at given steps: Table 4 would mislead


def test_fif_run_on_vit_b16_shows_table_4():
    from fomo_jax.configs import fif

    config = fif.get_config()
    rows, paper = _report(config, get_config("ViT-B-16"))
    assert rows["model"] == "ViT-B-16" and rows["steps per task"] == "1420 (Table 4)"
    assert rows["total steps"] == "28400" and rows["batch size"] == "512"
    assert rows["MAF"] == "63394.7585 = 1.0000 x full fine-tuning's (Table 4)"
    lines = paper.splitlines()
    assert lines[0].split()[-1] == "T=20" and len(lines) == 2 + len(budget.PAPER_TABLE) + 2
    assert lines[2].split()[0] == "finetune" and lines[2].split()[-1] == "1420"
    # Given steps on ViT-B/16 under the paper's budget: still the paper's setting.
    config.steps_per_task = 100
    rows, paper = _report(config, get_config("ViT-B-16"))
    assert rows["steps per task"] == "100 (config.steps_per_task)" and paper
    # The measured budget on ViT-B/16 does not use Table 4.
    config.budget = "measured"
    assert _report(config, get_config("ViT-B-16"))[1] == ""


def test_table_4_shows_whenever_the_steps_or_mafs_come_from_it():
    # Steps from Table 4 on a tiny model (no step count given): the table explains them.
    rows, paper = _report(_smoke_config(steps_per_task=None, num_tasks=20))
    assert rows["steps per task"] == "1420 (Table 4)" and paper
    # Equal compute on Table 4's MAFs: LoRA r=4's MAF 47407.8446 / 63394.7585 = 0.7478.
    config = _smoke_config(steps_per_task=200, equal_compute=True, method="lora")
    config.methods.lora.rank = 4
    rows, paper = _report(config)
    assert rows["MAF"] == "47407.8446 = 0.7478 x full fine-tuning's (Table 4)" and paper
    assert rows["steps per task"].startswith("267 ")  # floor(200 / 0.7478...)
    # A θ0 checkpoint is named by its shapes, whatever config.model.name says.
    rows, paper = _report(_smoke_config(), get_config("ViT-B-16"))
    assert rows["model"] == "ViT-B-16" and paper


def test_shows_paper_table_rule():
    given = {"maf_source": None}
    assert budget.shows_paper_table(given, budget="paper", model="ViT-B-16")
    assert budget.shows_paper_table(given, budget="paper", model="ViT-B-16-quickgelu")
    assert not budget.shows_paper_table(given, budget="paper", model="ViT-L-14")
    assert not budget.shows_paper_table(given, budget="measured", model="ViT-B-16")
    assert budget.shows_paper_table({"maf_source": "Table 4"}, budget="paper", model="tiny")
    assert not budget.shows_paper_table({"maf_source": "measured"}, budget="measured", model="t")
