"""Every registered continual method on the VLM family: it runs (set up, a task of 3 steps of
the one jitted step, its end-of-task hook, evaluation weights, export to the plain VLM), or it
is refused at set-up, before any compute, with an error naming the method and the family.

Each method runs through the runner on a one-task stream of the synthetic world; the budget
tests set methods up with a stand-in `ctx.data` serving collated VLM batches."""

import dataclasses
import json

import ml_collections
import numpy as np
import pytest

from fomo_jax.continual import methods
from fomo_jax.data import vlm_batches as vb
from fomo_jax.data import vlm_synth
from fomo_jax.families import vlm as vlm_family
from fomo_jax.models import vlm
from fomo_jax.train import optimizer
from tests import compiled
from tests.continual.test_vlm_family import LM, TINY, _batch

# Refused, with the reason the error must give (a phrase of it).
REFUSED = {
    "er": "works with the model families ['clip'], not with config.family='vlm'",
    "der": "works with the model families ['clip'], not with config.family='vlm'",
    "derpp": "works with the model families ['clip'], not with config.family='vlm'",
    "zscl": "works with the model families ['clip'], not with config.family='vlm'",
    "locked_text": "locks the group 'text', which the vlm family does not have",
}
OPTIONS = {"lora": {"targets": "lm", "rank": 4}, "dora": {"targets": "lm", "rank": 4},
           "vera": {"targets": "lm", "rank": 4},
           "ewc": {"fisher_batch_size": 4, "fisher_batches": 2}}  # fmt: skip


class Data:
    """The update pool of a task as collated VLM batches."""

    root, datasets = "", {}

    def __init__(self, cfg):
        self.cfg = cfg

    def update_batches(self, task, batch_size, num_batches):
        for number in range(num_batches):
            batch = _batch(self.cfg, seed=100 * task + number)
            yield {k: v[:batch_size] for k, v in batch.items()}

    def pretraining_texts(self, count):
        return ["plain words"] * count


@pytest.fixture(scope="module")
def stream_config(tmp_path_factory):
    """A one-task VLM stream of 3 steps on the synthetic world, θ0 a LLaVA checkpoint of a
    random world-sized VLM (no staged making)."""
    from fomo_jax.configs import vlm_synth as vlm_synth_config
    from fomo_jax.models import hf_lm

    base = tmp_path_factory.mktemp("vlm_methods")
    config = vlm_synth_config.get_config("smoke")
    # One layer per tower: the test's cost is compiling each method's step.
    config.model.vlm.lm.update(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16,
                               num_hidden_layers=1)  # fmt: skip
    cfg = vlm_family.FAMILY.model_config(config)
    tower = dataclasses.replace(cfg.vision.vision, layers=1)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, vision=tower))
    model = vlm_family.FAMILY.init_model(cfg, seed=0)
    hf_lm.export_hf(model, str(base / "theta0"))
    config.theta0.checkpoint = str(base / "theta0")
    config.data.root = str(base / "root")
    config.num_tasks, config.data.skills = 1, ("count",)
    config.batch_size, config.steps_per_task = 4, 3
    config.log_every, config.checkpoint_every = 3, 0
    config.eval.batch_size = 2
    config.eval.kinds = ml_collections.ConfigDict(dict(colour=2, facts=2, count=2))
    for name, options in OPTIONS.items():
        config.methods[name].update(options)
    return config, base


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_runs_through_the_runner_on_the_vlm_or_is_refused(name, stream_config):
    """3 steps of the VLM stream through the runner (set-up, θ0, the method's task hooks
    (EWC's Fisher pass on the next-token loss, merges per group), evaluations, export of the
    plain VLM); a refused method stops at the config check, before any compute."""
    from fomo_jax.continual import runner
    from fomo_jax.models import hf_lm

    config, base = stream_config
    config = ml_collections.ConfigDict(config.to_dict())
    config.method = name
    workdir = base / name
    if name in REFUSED:
        with pytest.raises(ValueError) as error:
            runner.run(config, str(workdir))
        assert REFUSED[name] in str(error.value) and repr(name) in str(error.value)
        assert not workdir.exists() or not any(workdir.iterdir())
        return
    results = runner.run(config, str(workdir))
    assert not (base / "root" / "vlm_theta0").exists()  # θ0 is the checkpoint, not the recipe
    assert set(results["final"]) == set(vlm_family.FAMILY.metric_keys)
    losses = [json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")
              if '"loss"' in line]  # fmt: skip
    assert losses and np.isfinite(losses).all(), losses
    exported = hf_lm.load_pretrained(str(workdir / "model"))
    assert isinstance(exported, vlm.VisionLanguageModel) and exported.config.adapter is None
    world, tokenizer = vlm_synth.World(0), vlm_synth.WordTokenizer()
    batch = vb.collate([world.example("vqa", 0), world.example("pairs", 1)], tokenizer.encode,
                       vlm_synth.SPECIALS, exported.config.image_seq_length, 64, 1, 32)  # fmt: skip
    logits = compiled.call(exported, batch["tokens"], vlm_family.pixels(batch["images"]),
                           image_valid=batch["image_valid"],
                           attention_mask=batch["attention_mask"])  # fmt: skip
    assert np.isfinite(np.asarray(logits)).all()


def test_the_refusals_are_the_methods_that_need_clip():
    assert set(REFUSED) <= set(methods.METHODS)
    assert {"finetune", "ewc", "si", "lora", "ema_merge", "locked_image"} <= (
        set(methods.METHODS) - set(REFUSED)
    )


def test_method_mafs_come_from_the_vlms_compiled_step(tmp_path):
    """`budget="measured"` on the VLM: each method's step compiled on the VLM's abstract model
    and batch. Freezing the image tower removes its backward pass; EWC adds its Fisher pass."""
    from fomo_jax import budget, profiling

    cfg = vlm.VLMConfig(vision=TINY, lm=LM, image_token_id=259)
    config = ml_collections.ConfigDict({"seed": 0, "batch_size": 4, "trainable": None,
                                        "optimizer": {"clip_norm": 1.0}})  # fmt: skip
    tx, profiles = optimizer.adamw(), {}
    for name in ("finetune", "locked_image", "ewc"):
        method = methods.get(name, OPTIONS.get(name))
        method.setup(methods.Context(config=config, family=vlm_family.FAMILY, model_config=cfg,
                                     tokenizer=None, data=Data(cfg), workdir=str(tmp_path),
                                     steps_per_task=None))  # fmt: skip
        profiles[name] = profiling.profile_method(method, cfg, tx, 4)
    maf = {name: budget.maf(p, profiles["finetune"])["maf"] for name, p in profiles.items()}
    assert maf["locked_image"] < maf["finetune"] < maf["ewc"], maf
    assert profiles["ewc"]["extra_flops"] > 0 and profiles["finetune"]["extra_flops"] == 0


def test_the_paper_budget_is_clips():
    from fomo_jax.continual import runner

    config = ml_collections.ConfigDict({"budget": "paper", "steps_per_task": None,
                                        "n_samples": None, "equal_compute": False})  # fmt: skip
    with pytest.raises(ValueError, match="Table 4, measured for CLIP; the vlm family needs"):
        runner.check_budget_family(config, vlm_family.FAMILY)
    config.steps_per_task = 5  # steps given: the table is not read
    runner.check_budget_family(config, vlm_family.FAMILY)
    config.equal_compute = True
    with pytest.raises(ValueError, match="budget='measured'"):
        runner.check_budget_family(config, vlm_family.FAMILY)
    from fomo_jax.families import clip

    runner.check_budget_family(config, clip.FAMILY)
