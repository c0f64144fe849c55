"""benchmarks/fif_findings.py: the criteria of the six findings, and the study's smoke mode."""

from __future__ import annotations

import json
import os
import sys

import pytest

from fomo_jax import runtime

sys.path.insert(0, os.path.join(runtime.REPO_ROOT, "benchmarks"))

import fif_findings  # noqa: E402


def _arms(**finals) -> dict:
    """{arm: {"final": ...}} from arm=(A_KA, A_ZS) pairs; GM is their geometric mean."""
    return {
        name: {
            "final": {
                "knowledge_accumulation": ka,
                "zero_shot_retention": zs,
                "geometric_mean": (ka * zs) ** 0.5,
            }
        }  # fmt: skip
        for name, (ka, zs) in finals.items()
    }


@pytest.mark.parametrize(
    "finding, finals, passes",
    [
        # (1) a higher GM, or both scores higher, for some EMA-merge
        (1, dict(finetune=(50, 60), **{"ema_merge_w0.5": (45, 70)}), True),  # GM 56.1 > 54.8
        (1, dict(finetune=(50, 60), **{"ema_merge_w0.5": (40, 65)}), False),
        # (2) the best meta-schedule by GM must beat warmup-cosine on both scores
        (2, dict(finetune=(50, 60), rsqrt_meta=(51, 61), warmup_cosine_meta=(30, 70)), True),
        (2, dict(finetune=(50, 60), rsqrt_meta=(60, 59), warmup_cosine_meta=(30, 70)), False),
        # (3) GM rising with every size
        (3, dict(finetune=(50, 60), mini=(52, 60), small=(55, 60)), True),
        (3, dict(finetune=(50, 60), mini=(56, 60), small=(55, 60)), False),
        # (4) A_ZS without replay lower by more than 5
        (4, dict(finetune=(50, 60), no_replay=(55, 54)), True),
        (4, dict(finetune=(50, 60), no_replay=(55, 56)), False),
        # (5) fine-tuning or its merge beats every specialised method on GM
        (5, dict(finetune=(50, 60), ema_merge_equal_compute=(40, 60), si_equal_compute=(49, 60),
                 er_equal_compute=(30, 60)), True),  # fmt: skip
        (5, dict(finetune=(50, 60), ema_merge_equal_compute=(40, 60), si_equal_compute=(52, 60),
                 er_equal_compute=(30, 60)), False),  # fmt: skip
        # (6) every PEFT's A_KA more than 5 below fine-tuning's
        (6, dict(finetune=(50, 60), lora_equal_compute=(40, 70), vera_equal_compute=(44, 70)),
         True),
        (6, dict(finetune=(50, 60), lora_equal_compute=(40, 70), vera_equal_compute=(46, 70)),
         False),
    ],
)  # fmt: skip
def test_criteria(finding, finals, passes):
    ok, numbers = fif_findings.verdict(finding, _arms(**finals))
    assert ok is passes, numbers


def test_smoke_study_writes_the_table(smoke_data_root, tmp_path):
    out = tmp_path / "table"
    fif_findings.main(["--smoke", "--findings", "4", "--data", smoke_data_root,
                       "--workdir", str(tmp_path / "runs"), "--out", str(out)])  # fmt: skip
    report = json.loads((tmp_path / "table.json").read_text())
    assert report["config"] == "fif_synth:smoke"
    assert set(report["arms"]) == {"finetune", "no_replay"}
    for arm in report["arms"].values():
        assert set(arm["final"]) == set(fif_findings.KEYS)
        assert len(arm["trajectory"]) == 3  # zero-shot, then after each of the 2 tasks
    (finding,) = report["findings"].values()
    assert finding["arms"] == ["finetune", "no_replay"] and isinstance(finding["passes"], bool)
    assert (tmp_path / finding["figure"]).stat().st_size > 0
    table = (tmp_path / "table.md").read_text().splitlines()
    assert sum(line.startswith("| (4) replay is essential |") for line in table) == 1
    assert sum(line.startswith(("| finetune |", "| no_replay |")) for line in table) == 2
    # A rerun reuses the finished runs: the same numbers.
    again = fif_findings.main(["--smoke", "--findings", "4", "--data", smoke_data_root,
                               "--workdir", str(tmp_path / "runs"), "--out", str(out)])  # fmt: skip
    assert {k: a["final"] for k, a in again["arms"].items()} == {
        k: a["final"] for k, a in report["arms"].items()
    }
