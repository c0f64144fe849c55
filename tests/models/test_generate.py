"""Greedy decoding with the KV cache (`fomo_jax.models.generate`) against decoding without it.

The reference ("uncached") decodes each row alone and unpadded: the full forward over the real
prompt tokens followed by the tokens generated so far, argmax at the last one. It is run once
per batch, teacher-forced on the cached decoder's tokens: by causality the logits at index j of
one forward are those of a forward over the first j + 1 tokens, i.e. of re-running the model on
prompt + generated tokens at every step.

Near ties (CI rule: two different computations are never required to agree bit for bit):
cached and uncached logits differ by float32 rounding (~1e-6), so where the reference's top two
logits are closer than that, either token is a correct greedy step. The check accepts a token
when its reference logit is within `EPS` of the reference maximum, which is exact agreement
wherever the margin is clear; `_assert_decisive` guards that most steps are clear (with these
seeds the smallest top-2 margin is ~0.2), so the check cannot pass vacuously.

The tiny models are initialised with large weights (`initializer_range=0.5`): attention is then
sharp, so positions, cache slots and masks change the tokens. At HF's default 0.02 attention is
nearly uniform and the tokens depend on little but the last token, so off-by-one positions,
a masked newest slot or a cache that is never carried over all went unnoticed.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from fomo_jax import params as params_lib
from fomo_jax.models import generate as generate_lib
from fomo_jax.models.clip import CLIPConfig, VisionConfig
from fomo_jax.models.generate import greedy_generate
from fomo_jax.models.llama import LlamaConfig, abstract_lm, create_lm, decode
from fomo_jax.models.vlm import VLMConfig, create_vlm

LM = LlamaConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.5,
)  # fmt: skip
IMAGE_TOKEN = 96
VISION = CLIPConfig(vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=2, heads=4,
                                        mlp_dim=64))  # fmt: skip
EPS = 1e-3  # a tie: reference logits this close (rounding is ~1e-6 at this scale)
NEW = 6  # max_new_tokens of the batch tests


@pytest.fixture(scope="module")
def lm():
    return create_lm(LM, seed=0)


@pytest.fixture(scope="module")
def vlm():
    return create_vlm(VLMConfig(vision=VISION, lm=LM, image_token_id=IMAGE_TOKEN), seed=1)


def _lm_rows():
    rng = np.random.default_rng(0)
    return [rng.integers(1, IMAGE_TOKEN, n) for n in (5, 8, 3)]


def _vlm_rows(seq):
    """Row 0: text, image, text; row 1: text only; row 2: image first."""
    rng = np.random.default_rng(1)
    text = lambda n: rng.integers(1, IMAGE_TOKEN, n)  # noqa: E731
    image = np.full(seq, IMAGE_TOKEN)
    rows = [np.concatenate([text(2), image, text(2)]), text(5), np.concatenate([image, text(3)])]
    pixels = rng.standard_normal((3, 16, 16, 3)).astype(np.float32)
    return rows, pixels, np.array([True, False, True])


def _pad(rows, side, length=None):
    """token_ids, attention_mask [B, length] with each row's tokens on the left or right."""
    length = length or max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), bool)
    for b, row in enumerate(rows):
        where = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[b, where], mask[b, where] = row, True
    return ids, mask


def _reference_logits(model, rows, new_tokens, images=None, image_valid=None):
    """Uncached logits [B, N, V] of every new token: each row unpadded, its real prompt then
    the new tokens, through the full forward (causal, default positions 0..)."""
    batch, steps = new_tokens.shape
    lengths = np.array([len(r) for r in rows])
    prompts, _ = _pad(rows, "right", lengths.max() + steps)  # filler after: causal, unseen
    if images is None:
        hidden = model.lm.embed(prompts)
    else:
        hidden = model.embed(prompts, images, image_valid=image_valid)
    # New tokens are embedded as text even when one equals the image token (as decoding does).
    index = lengths[:, None] + np.arange(steps)
    new = np.asarray(model.lm.embed(new_tokens))
    hidden = np.array(hidden)
    hidden[np.arange(batch)[:, None], index] = new
    logits = np.asarray(decode(model.lm, hidden))
    # Token k is predicted at the index of token k - 1 (the last prompt token for k = 0).
    return logits[np.arange(batch)[:, None], index - 1]


def _near_argmax(reference, tokens):
    """[B, N] bool: each token's reference logit is within EPS of the reference maximum."""
    chosen = np.take_along_axis(reference, tokens[..., None], axis=-1)[..., 0]
    return chosen >= reference.max(axis=-1) - EPS


def _assert_decisive(reference):
    """Most steps have a clear top-2 margin, so `_near_argmax` demands exact agreement there."""
    top2 = np.sort(reference, axis=-1)[..., -2:]
    assert np.mean(top2[..., 1] - top2[..., 0] > 10 * EPS) >= 0.9


def _assert_greedy(model, rows, out, images=None, image_valid=None):
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    steps = tokens.shape[1]
    reference = _reference_logits(model, rows, np.maximum(tokens, 0), images, image_valid)
    _assert_decisive(reference)
    generated = np.arange(steps) < lengths[:, None]
    bad = generated & ~_near_argmax(reference, np.maximum(tokens, 0))
    assert not bad.any(), (
        f"cached tokens that are not the uncached argmax at (row, step) {np.argwhere(bad)}:\n"
        f"cached {tokens}\nuncached argmax {reference.argmax(-1)}"
    )


def _assert_same_up_to_ties(model, row, a, b):
    """Two decodings of one row agree until a step where the reference has a near tie."""
    reference = _reference_logits(model, [row], np.asarray(a)[None])[0]
    differ = np.flatnonzero(np.asarray(a) != np.asarray(b))
    if differ.size:
        k = differ[0]
        gap = reference[k, a[k]] - reference[k, b[k]]
        assert abs(gap) < EPS, f"step {k}: {a[k]} vs {b[k]}, reference gap {gap}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_lm_cached_equals_uncached(lm, side):
    rows = _lm_rows()
    ids, mask = _pad(rows, side)
    out = greedy_generate(lm, ids, mask, max_new_tokens=NEW)
    assert out.tokens.shape == (3, NEW) and out.tokens.dtype == np.int32
    np.testing.assert_array_equal(out.lengths, NEW)
    _assert_greedy(lm, rows, out)


@pytest.mark.parametrize("side", ["left", "right"])
def test_vlm_cached_equals_uncached(vlm, side):
    rows, pixels, valid = _vlm_rows(vlm.config.image_seq_length)
    ids, mask = _pad(rows, side)
    out = greedy_generate(vlm, ids, mask, max_new_tokens=NEW, images=pixels, image_valid=valid)
    _assert_greedy(vlm, rows, out, pixels, valid)
    # The images matter: without them (image tokens as text) the decoding changes.
    text_only = _reference_logits(vlm, rows, np.asarray(out.tokens))
    assert not _near_argmax(text_only, np.asarray(out.tokens))[[0, 2]].all()


def test_padding_side_does_not_change_tokens(lm):
    rows = _lm_rows()
    row = 2  # the shortest prompt: the most padding
    alone = greedy_generate(lm, rows[row][None], max_new_tokens=NEW).tokens[0]
    for side in ("left", "right"):
        ids, mask = _pad(rows, side, length=10)
        padded = greedy_generate(lm, ids, mask, max_new_tokens=NEW).tokens[row]
        _assert_same_up_to_ties(lm, rows[row], np.asarray(padded), np.asarray(alone))


def test_stop_tokens_end_rows(lm):
    rows = _lm_rows()
    ids, mask = _pad(rows, "left")
    free = np.asarray(greedy_generate(lm, ids, mask, max_new_tokens=NEW).tokens)
    stops = (int(free[2, 0]), int(free[0, 3]))  # row 2 stops at once, row 0 by step 3
    out = greedy_generate(lm, ids, mask, max_new_tokens=NEW, stop_tokens=stops, pad_id=-1)
    # Same executable and inputs as `free` up to each stop, so the tokens match exactly.
    for b in range(3):
        hits = np.flatnonzero(np.isin(free[b], stops))
        length = hits[0] + 1 if hits.size else NEW
        want = np.where(np.arange(NEW) < length, free[b], -1)
        np.testing.assert_array_equal(out.tokens[b], want)
        assert out.lengths[b] == length
    assert out.lengths[2] == 1 and out.lengths[0] <= 4
    # One int works as well as a sequence.
    single = greedy_generate(lm, ids, mask, max_new_tokens=NEW, stop_tokens=stops[0], pad_id=-1)
    assert int(single.lengths[2]) == 1


@pytest.mark.parametrize("new", [1, 3])
def test_max_new_tokens(lm, new):
    rows = _lm_rows()
    ids, mask = _pad(rows, "right")
    out = greedy_generate(lm, ids, mask, max_new_tokens=new)
    assert out.tokens.shape == (3, new)
    np.testing.assert_array_equal(out.lengths, new)
    _assert_greedy(lm, rows, out)


def test_compiled_once_per_shape(lm, monkeypatch):
    traces = []
    prefill = generate_lib._prefill

    def counting(*args):
        traces.append(args[1].shape)
        return prefill(*args)

    monkeypatch.setattr(generate_lib, "_prefill", counting)
    ids, mask = _pad([np.arange(1, 5), np.arange(7, 9)], "left")  # [2, 4]: no other test's
    first = greedy_generate(lm, ids, mask, max_new_tokens=2)
    greedy_generate(lm, ids[::-1], mask[::-1], max_new_tokens=2, stop_tokens=5, pad_id=3)
    greedy_generate(lm, ids, mask, max_new_tokens=2, stop_tokens=7, pad_id=0)
    assert len(traces) == 1, traces
    greedy_generate(lm, ids, mask, max_new_tokens=3)  # a new shape compiles again
    assert len(traces) == 2
    assert first.tokens.shape == (2, 2)


def test_input_checks(lm, vlm):
    ids, mask = _pad(_lm_rows(), "left")
    with pytest.raises(ValueError, match="at least one token"):
        greedy_generate(lm, ids, mask & (np.arange(3) != 1)[:, None], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(lm, ids, mask, max_new_tokens=0)
    with pytest.raises(TypeError, match="text only"):
        greedy_generate(lm, ids, mask, max_new_tokens=2, images=np.zeros((3, 16, 16, 3)))
    rows, pixels, valid = _vlm_rows(vlm.config.image_seq_length)
    ids, mask = _pad(rows, "left")
    with pytest.raises(ValueError, match="image tokens"):
        greedy_generate(vlm, ids, mask, max_new_tokens=2, images=pixels)  # 3 images, 2 runs


def _lm_from_hf(hf, cfg):
    """Our LM with the weights of a transformers LlamaForCausalLM (converted by hand, so this
    test does not depend on the checkpoint converter)."""
    sd = {k: jnp.asarray(v.detach().numpy()) for k, v in hf.state_dict().items()}
    flat = {
        "lm/embed_tokens/embedding": sd["model.embed_tokens.weight"],
        "lm/norm/scale": sd["model.norm.weight"],
        "lm/lm_head/kernel": sd["lm_head.weight"].T,
    }
    for i in range(cfg.num_hidden_layers):
        theirs, ours = f"model.layers.{i}.", f"lm/transformer/resblocks/{i}/"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            flat[f"{ours}{norm}/scale"] = sd[f"{theirs}{norm}.weight"]
        for name in "qkvo":
            flat[f"{ours}attn/{name}_proj/kernel"] = sd[f"{theirs}self_attn.{name}_proj.weight"].T
        for name in ("gate", "up", "down"):
            flat[f"{ours}mlp/{name}_proj/kernel"] = sd[f"{theirs}mlp.{name}_proj.weight"].T
    graphdef, params = params_lib.split(abstract_lm(cfg))
    assert set(flat) == set(params_lib.flatten(params))
    return params_lib.merge(graphdef, params_lib.unflatten(flat))


def test_matches_transformers_generate():
    """Left-padded batch: the same tokens as transformers' generate(do_sample=False)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=LM.vocab_size, hidden_size=LM.hidden_size,
        intermediate_size=LM.intermediate_size, num_hidden_layers=LM.num_hidden_layers,
        num_attention_heads=LM.num_attention_heads, num_key_value_heads=LM.num_key_value_heads,
        head_dim=LM.head_dim, rms_norm_eps=LM.rms_norm_eps, rope_theta=LM.rope_theta,
        initializer_range=LM.initializer_range, pad_token_id=0, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    model = _lm_from_hf(hf, LM)
    rows = _lm_rows()
    ids, mask = _pad(rows, "left")
    with torch.no_grad():
        theirs = hf.generate(
            torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
            max_new_tokens=NEW, do_sample=False,
        )[:, ids.shape[1]:].numpy()  # fmt: skip
    ours = np.asarray(greedy_generate(model, ids, mask, max_new_tokens=NEW).tokens)
    for b, row in enumerate(rows):
        _assert_same_up_to_ties(model, row, ours[b], theirs[b])
