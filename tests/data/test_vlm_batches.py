"""VLM batches: the loss-mask invariants of spec §3.3 as properties over random examples of
every source kind, wrappers and prefixes, errors, and the loss normalisations against float64
numpy formulas."""

import numpy as np
import pytest

from fomo_jax.data import vlm_batches as vb

SPECIALS = vb.Specials(image=259, eos=258, eou=261, pad=0, wrapper=260)
SEQ, SIZE = 4, 8


def encode(text: str) -> list[int]:  # bytes 1..256, as the byte tokenizer
    return [b + 1 for b in text.encode()]


def _words(rng, n):
    return " ".join(rng.choice(["red", "cube", "a", "dax", "on", "the", "blue"], n))


def _image(rng):
    return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def _random_example(rng):
    kind = rng.choice(["pairs", "documents", "sft", "text"])
    if kind == "pairs":
        return vb.pair(_image(rng), _words(rng, rng.integers(1, 5)))
    if kind == "documents":
        parts = []
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.6:
                parts.append(_image(rng))
            parts.append(_words(rng, rng.integers(1, 6)))
        return vb.document(parts)
    if kind == "sft":
        turns = [(_words(rng, rng.integers(1, 4)), _words(rng, rng.integers(1, 4)))
                 for _ in range(rng.integers(1, 3))]  # fmt: skip
        return vb.sft(turns, _image(rng) if rng.random() < 0.7 else None)
    return vb.text(_words(rng, rng.integers(1, 8)))


def _expected_targets(example) -> list[int]:
    """The ids that must be targets, in order, written from the spec's rules per source."""
    ids = []
    for segment in example.segments:
        if isinstance(segment, vb.Image) or not segment.loss:
            continue
        special = {"<eos>": SPECIALS.eos, "<eou>": SPECIALS.eou}
        ids += [special[segment.text]] if isinstance(segment, vb._Special) else encode(segment.text)
    return ids


def test_loss_mask_invariants_hold_on_random_examples_of_every_source():
    rng = np.random.default_rng(0)
    kinds = set()
    for trial in range(60):
        examples = [_random_example(rng) for _ in range(4)]
        kinds |= {e.source for e in examples}
        batch = vb.collate(examples, encode, SPECIALS, SEQ, length=160, max_images=4,
                           image_size=SIZE)  # fmt: skip
        tokens, mask, real = batch["tokens"], batch["loss_mask"], batch["attention_mask"]
        for row, example in enumerate(examples):
            t = np.flatnonzero(mask[row])
            nxt = tokens[row, t + 1]
            # 1. never an image slot or wrapper as a target; 3. never padding
            assert not np.isin(nxt, [SPECIALS.image, SPECIALS.wrapper]).any()
            assert real[row, t + 1].all() and not mask[row, ~real[row]].any()
            assert not mask[row, -1]
            # 2. exactly the source's supervised tokens (a first token has no predecessor)
            want = _expected_targets(example)
            first_is_target = example.segments[0].loss if not isinstance(
                example.segments[0], vb.Image) else False  # fmt: skip
            assert nxt.tolist() == (want[1:] if first_is_target else want), (trial, example)
            # images: one run of SEQ slots per valid image, the pixels in order
            slots = int(np.sum(tokens[row] == SPECIALS.image))
            images = [s.pixels for s in example.segments if isinstance(s, vb.Image)]
            assert slots == SEQ * len(images) == SEQ * batch["image_valid"][row].sum()
            for number, pixels in enumerate(images):
                np.testing.assert_array_equal(batch["images"][row, number], pixels)
            # the prefix ends where the first target starts
            prefix = batch["prefix_length"][row]
            assert not mask[row, : prefix - 1].any() and (len(t) == 0 or t[0] == prefix - 1)
    assert kinds == {"pairs", "documents", "sft", "text"}


def test_sft_supervises_answers_and_their_terminators_only():
    example = vb.sft([("what?", "a dax"), ("and?", "no")], _image(np.random.default_rng(1)))
    batch = vb.collate([example], encode, SPECIALS, SEQ, 96, 1, SIZE)
    tokens, mask = batch["tokens"][0], batch["loss_mask"][0]
    targets = tokens[np.flatnonzero(mask) + 1]
    assert targets.tolist() == encode("a dax") + [SPECIALS.eou] + encode("no") + [SPECIALS.eou]
    # The user's terminators are in the sequence but are not targets.
    assert int(np.sum(tokens == SPECIALS.eou)) == 4


def test_adjacent_images_share_one_wrapper():
    rng = np.random.default_rng(2)
    example = vb.document([_image(rng), _image(rng), "two cubes"])
    tokens = vb.collate([example], encode, SPECIALS, SEQ, 64, 2, SIZE)["tokens"][0]
    w, i = SPECIALS.wrapper, SPECIALS.image
    assert tokens[: 3 + 2 * SEQ].tolist() == [w] + [i] * SEQ + [w] + [i] * SEQ + [w]


def test_collate_names_the_example_that_does_not_fit():
    rng = np.random.default_rng(3)
    examples = [vb.text("short"), vb.pair(_image(rng), "a long caption " * 5)]
    with pytest.raises(ValueError, match=r"example 1 \(pairs\) has 82 tokens; the batch holds 40"):
        vb.collate(examples, encode, SPECIALS, SEQ, 40, 1, SIZE)
    with pytest.raises(ValueError, match=r"example 0 \(documents\) has 2 images; .* holds 1"):
        vb.collate([vb.document([_image(rng), "a", _image(rng), "b"])], encode, SPECIALS, SEQ,
                   64, 1, SIZE)  # fmt: skip
    with pytest.raises(ValueError, match=r"image 0 is \(4, 4, 3\)"):
        vb.collate([vb.pair(np.zeros((4, 4, 3), np.uint8), "x")], encode, SPECIALS, SEQ, 64, 1,
                   SIZE)  # fmt: skip


def _nll64(logits, tokens):
    logits = np.asarray(logits, np.float64)[:, :-1]
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(tokens)[:, 1:, None], -1)[..., 0]


def test_loss_normalizations_against_float64_formulas():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, (3, 7))
    mask = np.zeros((3, 7), bool)
    mask[0, :6] = True  # a long document: 6 targets
    mask[1, 2] = True  # a short answer: 1 target
    # row 2: no targets (e.g. padding only): left out of the per-example mean
    nll = _nll64(logits, tokens)
    m = mask[:, :-1]
    token = (nll * m).sum() / m.sum()
    example = np.mean([(nll[r] * m[r]).sum() / m[r].sum() for r in (0, 1)])
    got_token = float(vb.next_token_loss(logits, tokens, mask, "token"))
    got_example = float(vb.next_token_loss(logits, tokens, mask, "example"))
    np.testing.assert_allclose([got_token, got_example], [token, example], rtol=1e-6)
    assert abs(token - example) > 1e-3  # the switch matters on such a batch
    assert float(vb.next_token_loss(logits, tokens, np.zeros_like(mask))) == 0.0
    with pytest.raises(ValueError, match="normalization='sum'"):
        vb.next_token_loss(logits, tokens, mask, "sum")
