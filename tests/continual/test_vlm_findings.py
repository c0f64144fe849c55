"""benchmarks/vlm_findings.py: the thresholds of findings (a)-(e) (the smoke study, which needs
the staged recipe's caches, is in test_vlm_stream.py)."""

from __future__ import annotations

import os
import sys

import pytest

from fomo_jax import runtime

sys.path.insert(0, os.path.join(runtime.REPO_ROOT, "benchmarks"))

import vlm_findings  # noqa: E402


def _recipe(**arms) -> dict:
    """{arm: summary} from arm=(VQA, text retention[, extra scores])."""
    out = {}
    for name, (vqa, text, *scores) in arms.items():
        scores = scores[0] if scores else {}
        out[name] = {"mean": dict(vqa=vqa, text_retention=text,
                                  **{f"scores.{k}": v for k, v in scores.items()}),
                     "runs": [{"visual_tokens": 4 if "perceiver" in name else 16,
                               "train_flops": 1e6 if "perceiver" in name else 3e6}]}  # fmt: skip
    return out


def _stream(**arms) -> dict:
    """{arm: summary} from arm=(A_KA, A_ZS, text retention)."""
    keys = ("knowledge_accumulation", "zero_shot_retention", "text_retention")
    return {name: {"mean": dict(zip(keys, v, strict=True))} for name, v in arms.items()}


A = dict(
    vl_reordered=(30, 40, {"binding_k0": 25, "binding_k4": 25}),
    vl_mixture=(31, 45, {"binding_k0": 25, "binding_k4": 40}),
    vl_docs_pairs=(28, 42),
)
B = dict(
    connector_stage=(10, 60),
    vl_pairs=(40, 40),  # pairs-only lost 20 points of text
    lm_text_sft=(10, 65),
)  # the LM-only control (reported, not judged)
C = dict(vl_lm_lora=(30, 50, {"binding_k0": 1}), vl_mixture=(35, 45, {"binding_k0": 2}))
D = dict(mlp_connector=(50, 60, {"colour": 80, "shape": 70, "count": 40, "position": 30}))


@pytest.mark.parametrize(
    "finding, arms, passes",
    [
        # (a) interleaved keeps >= 5 points more text than pairs at equal steps and pictures
        ("a", _recipe(vl_pairs=(30, 40), vl_pairs_equal_images=(32, 39), vl_interleaved=(30, 45),
                      **A), True),
        ("a", _recipe(vl_pairs=(30, 40), vl_pairs_equal_images=(32, 39),
                      vl_interleaved=(30, 44.9), **A), False),
        ("a", _recipe(vl_pairs=(30, 40), vl_pairs_equal_images=(32, 40.1),
                      vl_interleaved=(30, 45), **A), False),
        # (b) recover >= half of the 20 points lost, VQA within 2 points
        ("b", _recipe(sft_no_text=(50, 41), sft_text=(51.5, 51), **B), True),
        ("b", _recipe(sft_no_text=(50, 41), sft_text=(51.5, 50.9), **B), False),
        ("b", _recipe(sft_no_text=(50, 41), sft_text=(52.5, 55), **B), False),
        # (c) the frozen LM's text retention is the connector stage's, exactly
        ("c", _recipe(connector_stage=(10, 60), vl_lm_frozen=(20, 60, {"binding_k0": 0}), **C),
         True),
        ("c", _recipe(connector_stage=(10, 60), vl_lm_frozen=(20, 59.9, {"binding_k0": 0}),
                      **C), False),
        # (d) colour and shape within 2 points
        ("d", _recipe(perceiver_4=(45, 60, {"colour": 78, "shape": 69, "count": 10,
                                            "position": 20}), **D), True),
        ("d", _recipe(perceiver_4=(45, 60, {"colour": 77.9, "shape": 69, "count": 10,
                                            "position": 20}), **D), False),
    ],
)  # fmt: skip
def test_recipe_thresholds(finding, arms, passes):
    ok, numbers = vlm_findings.verdict(finding, arms)
    assert ok is passes, numbers


def _e(ft_zs=40, merge_zs=42, ft_ka=60, lora_ka=58, ft_text=35, ft_text0=30) -> dict:
    return _stream(**{"finetune_replay0.33": (ft_ka, ft_zs, ft_text),
                      "finetune_replay0": (ft_ka, ft_zs, ft_text0),
                      "lora_replay0.33": (lora_ka, 50, 40), "lora_replay0": (lora_ka, 50, 40),
                      "ema_merge_replay0.33": (50, merge_zs, 35),
                      "ema_merge_replay0": (50, merge_zs, 30)})  # fmt: skip


@pytest.mark.parametrize("changes, passes", [
    ({}, True),
    ({"merge_zs": 41.9}, False),  # ema_merge keeps < 2 points more A_ZS
    ({"lora_ka": 58.1}, False),  # LoRA within 2 points of fine-tuning's A_KA
    ({"ft_text0": 30.1}, False),  # replay adds < 5 points of text retention
])  # fmt: skip
def test_continual_thresholds(changes, passes):
    ok, numbers = vlm_findings.verdict("e", _e(**changes))
    assert ok is passes, numbers


def test_every_finding_names_known_arms():
    for _, arms in vlm_findings.FINDINGS.values():
        assert set(arms) <= set(vlm_findings.RECIPE_ARMS) | set(vlm_findings.STREAM_ARMS)
    assert len(vlm_findings.STREAM_ARMS) == 6


def test_pairs_at_equal_pictures_count_the_pictures_collate_lays_out():
    """The equal-pictures arm of (a): pairs for the interleaved arm's steps times a document's
    mean pictures, counted here from the rows as `collate` lays them out."""
    from fomo_jax.configs import vlm_synth as vlm_synth_config
    from fomo_jax.data import vlm_stream, vlm_synth

    base = vlm_synth_config.get_config()
    world, encode = vlm_synth.World(base.data.synth_seed), vlm_synth.WordTokenizer().encode
    pictures = [vlm_stream.example_stats(world.example("documents", i), encode, 16)["images"]
                for i in range(256)]  # fmt: skip
    assert 2 < sum(pictures) / 256 < 5
    changes = vlm_findings.pairs_at_equal_images(base)
    assert changes["theta0.stages.vl.steps"] == round(300 * sum(pictures) / 256)
    assert changes["theta0.stages.vl.sources"] == {"pairs": 1.0}
