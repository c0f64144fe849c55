"""The VLM family in the one jitted train step: its next-token loss on collated batches,
trainability rules (frozen leaves bitwise unchanged), per-group learning-rate multipliers, both
loss normalisations and both fusions."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from fomo_jax import models, sharding
from fomo_jax import params as params_lib
from fomo_jax.continual import methods
from fomo_jax.data import vlm_batches as vb
from fomo_jax.families import vlm as vlm_family
from fomo_jax.models import adapters, llama, vlm
from fomo_jax.train import optimizer
from fomo_jax.train import step as step_lib
from tests import compiled

# One layer per tower: these tests' cost is compiling their steps.
LM = llama.LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
_TINY = models.get_config("tiny")
TINY = dataclasses.replace(_TINY, vision=dataclasses.replace(_TINY.vision, layers=1))
SPECIALS = vb.Specials(image=259, eos=258, eou=261, pad=0, wrapper=260)


def _config(**changes):
    return vlm.VLMConfig(vision=TINY, lm=LM, image_token_id=259, **changes)


def _batch(cfg, seed=0):
    rng = np.random.default_rng(seed)

    def image():
        return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)

    examples = [
        vb.pair(image(), "a red cube"),
        vb.sft([("what?", "a dax")], image()),
        vb.document([image(), "two blue things", "then text"]),
        vb.text("plain words"),
    ]
    encode = lambda s: [b + 1 for b in s.encode()]  # noqa: E731
    return vb.collate(examples, encode, SPECIALS, cfg.image_seq_length, length=64,
                      max_images=1, image_size=32)  # fmt: skip


def _step(family, cfg, trainable, multipliers=None, method="finetune", options=None):
    method = methods.get(method, options)
    config = ml_collections.ConfigDict({"trainable": trainable})
    method.setup(methods.Context(config=config, family=family, model_config=cfg, tokenizer=None,
                                 data=None, workdir="", steps_per_task=None))  # fmt: skip
    params = method.init_params(params_lib.split(family.init_model(cfg, seed=0))[1])
    tx, mesh, key = optimizer.adamw(), sharding.make_mesh(), step_lib.step_key(0)
    state = step_lib.fresh_state(params, method, tx, key)
    shardings = step_lib.shardings_of(jax.eval_shape(lambda: state), mesh, family.rules)
    if multipliers:
        multipliers = step_lib.lr_multipliers(step_lib.trained(params, method), family.group_of,
                                              multipliers)  # fmt: skip
    step = step_lib.compile_step(family, method.graphdef, tx, method, mesh, shardings,
                                 multipliers)  # fmt: skip
    return params, step, step_lib.place(state, shardings), method


def test_frozen_groups_stay_bitwise_and_multipliers_scale_their_group():
    cfg = _config()
    batch = _batch(cfg)
    trainable = (("image/.*", "frozen"), ("connector/.*", "full"), ("lm/.*", "full"))
    params, step, state = _step(vlm_family.FAMILY, cfg, trainable)[:3]
    _, step10, state10, _ = _step(vlm_family.FAMILY, cfg, trainable, {"connector": 10.0})
    state, metrics = step(state, batch, 1e-3)
    state10, _ = step10(state10, batch, 1e-3)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["supervised_tokens"]) > 20
    before, after, after10 = (params_lib.flatten(jax.device_get(p))
                              for p in (params, state.params, state10.params))  # fmt: skip
    for path, value in before.items():
        moved, moved10 = after[path] - value, after10[path] - value
        if path.startswith("image/"):  # frozen: not a bit moves
            assert np.array_equal(after[path], value) and np.array_equal(after10[path], value)
        elif path.startswith("connector/") and np.abs(moved).max() > 0:
            # Adam's first step is lr * sign-like u, the same in both runs: x10 exactly-ish
            np.testing.assert_allclose(moved10, 10 * moved, rtol=1e-4, atol=1e-9, err_msg=path)
        else:
            np.testing.assert_allclose(moved10, moved, rtol=1e-5, atol=1e-9, err_msg=path)
    assert any(np.abs(after[p] - before[p]).max() > 0 for p in before if p.startswith("lm/"))


@pytest.mark.parametrize("trainable", [
    (("lm/.*", "frozen"), (".*", "full")),  # the LM frozen (VILA's frozen-LM arm)
    (("connector/.*", "full"),),  # the connector alone (alignment); unmatched: frozen
    (("image/.*", "frozen"), ("connector/.*", "frozen"), ("lm/.*", "full")),
])  # fmt: skip
def test_frozen_leaves_stay_bitwise_under_each_rule_set(trainable):
    """Whatever the rules freeze does not move by a bit in two steps; what they train moves."""
    cfg = _config()
    params, step, state, method = _step(vlm_family.FAMILY, cfg, trainable)
    for seed in range(2):
        state, _ = step(state, _batch(cfg, seed=seed), 1e-2)
    before, after = (params_lib.flatten(jax.device_get(p)) for p in (params, state.params))
    frozen = [p for p in before if not method.trainable(p)]
    trained = [p for p in before if method.trainable(p)]
    assert frozen and trained
    for path in frozen:
        assert np.array_equal(after[path], before[path]), path
    assert all(any(np.abs(after[p] - before[p]).max() > 0 for p in trained if p.startswith(g))
               for g in {p.split("/")[0] for p in trained})  # fmt: skip


def test_loss_falls_with_either_normalisation_and_fusion():
    for family, fusion in ((vlm_family.FAMILY, "interleave"), (vlm_family.PER_EXAMPLE, "prefix")):
        cfg = _config(fusion=fusion, connector="mlp_downsample")
        batch = _batch(cfg, seed=1)
        _, step, state, _ = _step(family, cfg, (("image/.*", "frozen"), (".*", "full")))
        losses = []
        for _ in range(4):
            state, metrics = step(state, batch, 3e-3)
            losses.append(float(metrics["loss"]))
        assert losses[-1] < losses[0], (fusion, losses)


def test_family_paths_and_refusals():
    family, cfg = vlm_family.FAMILY, _config()
    paths = params_lib.flatten(params_lib.split(family.abstract_model(cfg))[1])
    assert {family.group_of(p) for p in paths} == {"image", "connector", "lm"}
    linears = family.linear_paths(cfg)
    assert all(f"{p}/kernel" in paths for p in linears) and len(linears) == 6 + 7
    with pytest.raises(ValueError, match="not under image/, connector/ or lm/"):
        family.group_of("logit_scale")
    config = ml_collections.ConfigDict({"tokenizer": "words"})
    with pytest.raises(ValueError, match="vocabulary of 100 ids is smaller than the world.s 184"):
        family.tokenizer(
            config,
            vlm.VLMConfig(vision=cfg.vision, lm=LM.replace(vocab_size=100), image_token_id=3),
        )
    with pytest.raises(ValueError, match="image_token_id=259, but the world's image token is 3"):
        family.tokenizer(config, cfg)
    with pytest.raises(ValueError, match="config.data.benchmark='vlm_synth'"):
        family.evaluator(config, object(), cfg, None)
    batch = family.abstract_batch(cfg, 4)
    assert set(batch) == set(family.batch_keys) and batch["tokens"].shape == (4, 16 + 2 + 32)


def test_added_special_tokens_train_while_the_lm_is_frozen():
    """The VLM's specials (image, wrapper, end of utterance) added after a 259-id vocabulary:
    with the LM frozen, their rows train and not a bit of the checkpoint's table moves."""
    lm = LM.replace(vocab_size=259, added_tokens=3)
    cfg = vlm.VLMConfig(vision=TINY, lm=lm, image_token_id=259)
    specials = vb.Specials(image=259, eos=258, eou=261, pad=0, wrapper=260)
    rng = np.random.default_rng(5)
    examples = [vb.sft([("what?", "a dax")], rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                for _ in range(4)]  # fmt: skip
    batch = vb.collate(examples, lambda s: [b + 1 for b in s.encode()], specials,
                       cfg.image_seq_length, 64, 1, 32)  # fmt: skip
    trainable = (("lm/added_.*", "full"), ("connector/.*", "full"), (".*", "frozen"))
    params, step, state, _ = _step(vlm_family.FAMILY, cfg, trainable)
    state, metrics = step(state, batch, 1e-2)
    before, after = params_lib.flatten(params), params_lib.flatten(jax.device_get(state.params))
    for path in before:
        same = np.array_equal(before[path], after[path])
        assert same == (not path.startswith(("lm/added_", "connector/"))), path
    # Logits cover the checkpoint's vocabulary and the added tokens.
    model = params_lib.merge(params_lib.split(vlm.abstract_vlm(cfg))[0], state.params)
    assert compiled.call(model, np.array([[1, 2, 3, 261, 260]], np.int32)).shape == (1, 5, 262)


@pytest.mark.parametrize("kind", ["lora", "dora", "vera"])
def test_adapters_on_the_lm_train_next_to_a_full_connector_and_fold_exactly(kind):
    """config.trainable: the connector in full, the LM's linears with adapters, the rest
    frozen; after a step the base weights are bitwise θ0's, and the exported (folded) plain VLM
    gives the adapted model's logits."""
    cfg = _config()
    batch = _batch(cfg, seed=2)
    trainable = (("connector/.*", "full"), ("lm/.*", "lora"), (".*", "frozen"))
    options = {"targets": "lm", "rank": 4}
    params, step, state, method = _step(vlm_family.FAMILY, cfg, trainable, method=kind,
                                        options=options)  # fmt: skip
    for _ in range(2):
        state, metrics = step(state, batch, 1e-2)
    before, after = params_lib.flatten(params), params_lib.flatten(jax.device_get(state.params))
    adapter_leaves = [p for p in before if adapters.is_adapter(p)]
    assert adapter_leaves and all(p.startswith(("lm/", "adapter_shared/")) for p in adapter_leaves)
    for path in before:
        moved = not np.array_equal(before[path], after[path])
        if path.startswith("connector/"):
            assert moved, path
        elif not adapters.trainable(path):  # base weights and VeRA's shared matrices
            assert not moved, path
    assert any(not np.array_equal(before[p], after[p]) for p in adapter_leaves)
    adapted = params_lib.merge(method.graphdef, state.params)
    plain_cfg, plain_params = method.export_params(jax.device_get(state.params))
    assert plain_cfg.adapter is None
    plain = params_lib.merge(params_lib.split(vlm.abstract_vlm(plain_cfg))[0], plain_params)
    images = vlm_family.pixels(batch["images"])
    kwargs = dict(image_valid=batch["image_valid"], attention_mask=batch["attention_mask"])
    want = compiled.call(adapted, batch["tokens"], images, **kwargs)
    np.testing.assert_allclose(np.asarray(compiled.call(plain, batch["tokens"], images, **kwargs)),
                               np.asarray(want), rtol=2e-4, atol=2e-4)  # fmt: skip
