"""Tokens added after a checkpoint's vocabulary: their own embedding and output rows, the
base vocabulary's logits untouched, folded into a larger vocabulary for export (transformers
loads it and gives the same logits)."""

import numpy as np
import pytest
import torch
import transformers

from fomo_jax import params as params_lib
from fomo_jax.models import hf_lm, llama

BASE = llama.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8)  # fmt: skip


def _models(tied: bool):
    cfg = BASE.replace(tie_word_embeddings=tied, added_tokens=3)
    model = llama.create_lm(cfg, seed=2)
    params = params_lib.split(model)[1]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 43, (2, 11)).astype(np.int32)
    ids[:, 3] = 41  # every row has an added token
    return cfg, model, params, ids


@pytest.mark.parametrize("tied", [False, True])
def test_added_tokens_leave_the_base_vocabulary_alone_and_fold_exactly(tied):
    cfg, model, params, ids = _models(tied)
    logits = np.asarray(model(ids))
    assert logits.shape == (2, 11, 43)
    # The base model alone (its own leaves, no added rows) on base ids: the first 40 columns.
    plain = {k: v for k, v in params["lm"].items() if not k.startswith("added_")}
    base_graph = params_lib.split(llama.abstract_lm(BASE.replace(tie_word_embeddings=tied)))[0]
    base = params_lib.merge(base_graph, {"lm": plain})
    base_ids = np.minimum(ids, 39)
    np.testing.assert_array_equal(np.asarray(model(base_ids))[..., :40],
                                  np.asarray(base(base_ids)))  # fmt: skip
    # Folded into a vocabulary of 43: the same logits for every id, added ones included.
    folded_params, folded_cfg = llama.fold_added_tokens(params, cfg)
    assert folded_cfg.vocab_size == 43 and folded_cfg.added_tokens == 0
    folded = params_lib.merge(params_lib.split(llama.abstract_lm(folded_cfg))[0], folded_params)
    np.testing.assert_allclose(np.asarray(folded(ids)), logits, rtol=1e-5, atol=1e-6)


def test_export_folds_added_tokens_for_transformers(tmp_path):
    cfg, model, _, ids = _models(tied=False)
    hf_lm.export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.config.vocab_size == 43
    with torch.no_grad():
        want = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), want, rtol=1e-4, atol=1e-4)


def test_added_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="added_tokens=-1"):
        BASE.replace(added_tokens=-1)
