"""Every registered continual method on the VLM family: it runs (set up, a task of 3 steps of
the one jitted step, its end-of-task hook, evaluation weights, export to the plain VLM), or it
is refused at set-up, before any compute, with an error naming the method and the family.

The methods run as the loop runs them, minus the runner (the VLM has no data stream there
yet): `ctx.data` serves collated VLM batches for the hooks that read the update pool (EWC's
Fisher pass)."""

import jax
import ml_collections
import numpy as np
import pytest

from fomo_jax import params as params_lib
from fomo_jax import sharding
from fomo_jax.continual import methods
from fomo_jax.families import vlm as vlm_family
from fomo_jax.models import vlm
from fomo_jax.train import optimizer
from fomo_jax.train import step as step_lib
from tests.continual.test_vlm_family import _batch, _config

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
def setting():
    cfg = _config()
    theta0 = jax.device_get(params_lib.split(vlm_family.FAMILY.init_model(cfg, seed=0))[1])
    config = ml_collections.ConfigDict({"seed": 0, "batch_size": 4, "trainable": None,
                                        "optimizer": {"clip_norm": 1.0}})  # fmt: skip
    return cfg, theta0, config, _batch(cfg, seed=9)


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_runs_on_the_vlm_or_is_refused_before_compute(name, setting, tmp_path):
    cfg, theta0, config, batch = setting
    method = methods.get(name, OPTIONS.get(name))
    ctx = methods.Context(config=config, family=vlm_family.FAMILY, model_config=cfg,
                          tokenizer=None, data=Data(cfg), workdir=str(tmp_path),
                          steps_per_task=3)  # fmt: skip
    if name in REFUSED:
        with pytest.raises(ValueError) as error:
            method.setup(ctx)
        assert REFUSED[name] in str(error.value) and repr(name) in str(error.value)
        return
    method.setup(ctx)
    params = method.init_params(theta0)
    tx, mesh, key = optimizer.adamw(), sharding.make_mesh(), step_lib.step_key(0)
    state = step_lib.fresh_state(params, method, tx, key)
    shardings = step_lib.shardings_of(jax.eval_shape(lambda: state), mesh, vlm_family.FAMILY.rules)
    step = step_lib.compile_step(vlm_family.FAMILY, method.graphdef, tx, method, mesh, shardings)
    train = method.train_params(0, params, state.method_state)
    state = step_lib.place(state.replace(params=train), shardings)
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch, 1e-3)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all(), losses
    host = jax.device_get((state.params, state.method_state))
    params, method_state = method.end_of_task(0, *host)
    evaluated = method.eval_params(0, params, method_state)
    export_cfg, export_params = method.export_params(jax.device_get(evaluated))
    assert isinstance(export_cfg, vlm.VLMConfig) and export_cfg.adapter is None
    plain = params_lib.merge(params_lib.split(vlm.abstract_vlm(export_cfg))[0], export_params)
    logits = plain(
        batch["tokens"],
        vlm_family.pixels(batch["images"]),
        image_valid=batch["image_valid"],
        attention_mask=batch["attention_mask"],
    )
    assert np.isfinite(np.asarray(logits)).all()


def test_the_refusals_are_the_methods_that_need_clip():
    assert set(REFUSED) <= set(methods.METHODS)
    assert {"finetune", "ewc", "si", "lora", "ema_merge", "locked_image"} <= (
        set(methods.METHODS) - set(REFUSED)
    )


def test_method_mafs_come_from_the_vlms_compiled_step(setting, tmp_path):
    """`budget="measured"` on the VLM: each method's step compiled on the VLM's abstract model
    and batch. Freezing the image tower removes its backward pass; EWC adds its Fisher pass."""
    from fomo_jax import budget, profiling

    cfg, _, config, _ = setting
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
