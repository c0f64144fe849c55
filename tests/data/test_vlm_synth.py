"""The synthetic vision-language world: determinism, held-out facts, loss masks per source,
mixtures (by examples and by supervised tokens), and its evaluation metrics against plain
Python."""

import numpy as np
import pytest

from fomo_jax.data import vlm_batches as vb
from fomo_jax.data import vlm_stream, vlm_synth

WORLD = vlm_synth.World(0)
TOKENIZER = vlm_synth.WordTokenizer()
SEQ = 16  # visual tokens per image (CLIP tiny: 32 px, patches of 8)
TRAINING = [s for s in vlm_synth.SOURCES if s != "lm_text"]


def test_examples_are_pure_functions_of_seed_source_and_index():
    other = vlm_synth.World(0)
    for source in vlm_synth.SOURCES:
        a, b = WORLD.example(source, 7), other.example(source, 7)
        assert vlm_synth.training_texts(a) == vlm_synth.training_texts(b)
        pictures = [(s.pixels, t.pixels) for s, t in zip(a.segments, b.segments, strict=True)
                    if isinstance(s, vb.Image)]  # fmt: skip
        assert all(np.array_equal(x, y) for x, y in pictures)
    assert vlm_synth.training_texts(WORLD.example("lm_text", 1)) != vlm_synth.training_texts(
        vlm_synth.World(1).example("lm_text", 1)
    )


def test_no_held_out_fact_in_any_training_source():
    """Correction 8: the held-out relation's facts only in LM-pretraining text."""
    held_out = WORLD.held_out_facts()
    relation = f" {vlm_synth.HELD_OUT_RELATION} "
    seen_in_lm_text = set()
    for index in range(400):
        for source in vlm_synth.SOURCES:
            text = " ".join(vlm_synth.training_texts(WORLD.example(source, index)))
            found = {fact for fact in held_out if fact[:-1] in text}
            if source == "lm_text":
                seen_in_lm_text |= found
            else:
                assert not found, (source, index, found)
                assert relation not in f" {text} ", (source, index, text)
    assert len(seen_in_lm_text) == len(held_out)  # the scan finds them where they are


def _supervised(example):
    """The decoded supervised targets of one collated example, and the batch."""
    batch = vb.collate([example], TOKENIZER.encode, vlm_synth.SPECIALS, SEQ, 300, 5, 32)
    targets = batch["tokens"][0, 1:][batch["loss_mask"][0, :-1]]
    return [vlm_synth.VOCAB[t] for t in targets], batch


@pytest.mark.parametrize("source", vlm_synth.SOURCES)
def test_loss_mask_rules_on_every_source(source):
    """Spec §3.3 from each source's meaning: image slots and padding never; pairs the caption,
    documents and LM text all text (each closed by ⟨eos⟩); conversations the answers and their
    ⟨eou⟩ terminators only."""

    def words(segment):  # vocabulary entries of a text segment
        if segment.text in ("<eos>", "<eou>"):
            return [segment.text]
        return [vlm_synth.VOCAB[i] for i in TOKENIZER.encode(segment.text)]

    for index in range(30):
        example = WORLD.example(source, index)
        targets, batch = _supervised(example)
        tokens, mask = batch["tokens"][0], batch["loss_mask"][0]
        assert not (mask[:-1] & (tokens[1:] == vlm_synth.SPECIALS.image)).any()
        last = np.flatnonzero(batch["attention_mask"][0])[-1]
        assert not mask[last:].any()  # padding, and the last token has no target
        texts = [s for s in example.segments if isinstance(s, vb.Text)]
        conversation = any(s.text == "Assistant: " for s in texts)
        if source not in vlm_synth.SKILLS:  # skills mix conversations and captioned pictures
            assert conversation == (source in ("vqa", "text_instr"))
        if not conversation:  # pairs (skills' captioned pictures too), documents, LM text
            expected = [w for s in texts for w in words(s)]
            assert expected[-1] == "<eos>"
            if isinstance(example.segments[0], vb.Text):  # nothing predicts the first token
                expected = expected[1:]
        else:
            answers = [i + 1 for i, s in enumerate(texts) if s.text == "Assistant: "]
            expected = [w for i in answers for s in texts[i : i + 2] for w in words(s)]
            assert expected[-1] == "<eou>"
        assert targets == expected


def test_documents_carry_five_times_the_text_per_image_of_pairs():
    def per_image(source):
        stats = [vlm_stream.example_stats(WORLD.example(source, i), TOKENIZER.encode, SEQ)
                 for i in range(200)]  # fmt: skip
        return sum(s["supervised_tokens"] for s in stats) / sum(s["images"] for s in stats)

    assert per_image("documents") >= 5 * per_image("pairs")


def _mixture(weights, unit, key="m"):
    lengths = {name: 300 for name in vlm_synth.SOURCES}
    return vlm_stream.Mixture(WORLD, weights, lengths, unit=unit, key=key,
                              encode=TOKENIZER.encode, seq=SEQ)  # fmt: skip


def test_mixture_by_examples_and_by_supervised_tokens():
    positions = range(3000)
    by_examples = _mixture({"pairs": 0.25, "vqa": 0.75, "documents": 0.0}, "examples")
    names = [by_examples.locate(p)[0] for p in positions]
    assert "documents" not in names  # a zero weight drops the source
    assert abs(names.count("pairs") / len(names) - 0.25) < 0.03
    assert [by_examples.locate(p) for p in range(50)] == [by_examples.locate(p)
                                                          for p in range(50)]  # fmt: skip

    # by tokens: each source's share of supervised tokens is its weight
    by_tokens = _mixture({"documents": 0.5, "vqa": 0.5}, "supervised_tokens")
    tokens = {"documents": 0, "vqa": 0}
    for p in range(1500):
        name, index = by_tokens.locate(p)
        stats = vlm_stream.example_stats(WORLD.example(name, index), TOKENIZER.encode, SEQ)
        tokens[name] += stats["supervised_tokens"]
    share = tokens["documents"] / sum(tokens.values())
    assert abs(share - 0.5) < 0.05, share
    # and the conversion is weight / mean supervised tokens, normalised
    means = {}
    for name in ("documents", "vqa"):
        counts = [sum(vb._tokens(WORLD.example(name, i), TOKENIZER.encode, vlm_synth.SPECIALS,
                                 SEQ)[1]) for i in range(vlm_stream.MEASURE)]  # fmt: skip
        means[name] = sum(counts) / len(counts)
    expected = np.array([0.5 / means["documents"], 0.5 / means["vqa"]])
    np.testing.assert_allclose(by_tokens.probabilities, expected / expected.sum(), rtol=1e-12)


def test_mixture_errors_name_the_fault():
    with pytest.raises(ValueError, match="unknown source 'photos'"):
        _mixture({"photos": 1.0}, "examples")
    with pytest.raises(ValueError, match="no source with a positive weight"):
        _mixture({"pairs": 0.0}, "examples")
    with pytest.raises(ValueError, match="mixture unit 'bytes'"):
        _mixture({"pairs": 1.0}, "bytes")
    short = vlm_stream.Mixture(WORLD, {"documents": 1.0}, {"documents": 20}, unit="examples",
                               key="m", encode=TOKENIZER.encode, seq=SEQ)  # fmt: skip
    with pytest.raises(ValueError, match="source 'documents' example 0 has .* tokens, more than"):
        short[0]


def test_tokenizer_round_trip_and_unknown_words():
    text = "the zorp lives in the north. 3 plus 4 is 7."
    text = text.replace("zorp", vlm_synth.ENTITY_NAMES[0])
    assert TOKENIZER.decode(TOKENIZER.encode(text)) == text
    with pytest.raises(ValueError, match="word 'unicorn'"):
        TOKENIZER.encode("the unicorn")


def test_slot_f1_against_hand_counts():
    reference = "a red circle at the top left. a blue square in the middle."
    assert vlm_synth.slot_f1(reference, reference) == 1.0
    # one of two predicted triples right, one of two reference triples found: P = R = 1/2
    assert vlm_synth.slot_f1("a red circle at the top left. a blue cross at the top.",
                             reference) == pytest.approx(0.5)  # fmt: skip
    # three predicted, two right: P = 2/3, R = 1 -> F1 = 0.8
    assert vlm_synth.slot_f1(reference + " a green ring at the bottom.", reference) == \
        pytest.approx(0.8)  # fmt: skip
    assert vlm_synth.slot_f1("nothing.", reference) == 0.0
    assert vlm_synth.description([vlm_synth.Thing("red", "circle", 4)]) == \
        "a red circle in the middle."  # fmt: skip


def test_multiple_choice_and_summary_against_plain_python():
    from fomo_jax import evaluate_vlm

    rng = np.random.default_rng(0)
    items = WORLD.eval_items("facts", 12)
    logits = rng.normal(size=(12, TOKENIZER.vocab_size))
    for row, item in enumerate(items[:5]):  # some rows right by construction
        logits[row, TOKENIZER.ids[item.answer]] = 50.0
    mc, cloze = evaluate_vlm.multiple_choice(logits, items, TOKENIZER)
    for row, item in enumerate(items):
        scores = {o: logits[row][TOKENIZER.ids[o]] for o in item.options}
        assert mc[row] == (max(scores, key=scores.get) == item.answer)
        assert cloze[row] == (VOCAB_ARGMAX(logits[row]) == item.answer)
    assert mc[:5].all() and cloze[:5].all()

    per_dataset = {k: {"accuracy": float(v)} for k, v in zip(
        ["colour", "shape", "position", "caption", "count", "reading", "facts", "facts_cloze"],
        [80, 60, 40, 20, 10, 30, 50, 70], strict=True)}  # fmt: skip
    got = evaluate_vlm.summary(per_dataset, ["count", "reading"])
    assert got["knowledge_accumulation"] == 20.0
    assert got["zero_shot_retention"] == 50.0
    assert got["geometric_mean"] == pytest.approx((20.0 * 50.0) ** 0.5)
    assert got["text_retention"] == 60.0


def VOCAB_ARGMAX(row):  # noqa: N802
    return vlm_synth.VOCAB[int(np.argmax(row))]


def test_evaluation_items_are_fixed_prompts():
    a = WORLD.eval_items("colour", 10)
    b = vlm_synth.World(0).eval_items("colour", 10)
    assert [i.answer for i in a] == [i.answer for i in b]
    assert all(len(item.segments) == 5 for item in a)  # User, image, question, <eou>, Assistant
    shots = [i.shots for i in WORLD.eval_items("binding", 8)]
    assert shots == [0, 1, 2, 4, 0, 1, 2, 4]
    with pytest.raises(ValueError, match="unknown evaluation kind 'smell'"):
        WORLD.eval_items("smell", 1)


def test_batches_carry_each_rows_source_and_the_family_logs_its_loss():
    """`source` [B] indexes `vlm_synth.SOURCES`; `loss/<source>` is the mean next-token loss of
    that source's rows (float64 numpy reference on random logits)."""
    import jax.numpy as jnp
    import ml_collections

    from fomo_jax.families import vlm as vlm_family

    mixture = _mixture({"pairs": 1.0, "vqa": 1.0, "lm_text": 1.0}, "examples")
    pool = vlm_stream.Pool(mixture, 6)
    batches = vlm_stream.Batches({"update": pool}, 1, encode=TOKENIZER.encode, seq=SEQ,
                                 image_size=32)  # fmt: skip
    batch = batches.batch(0)
    names = [mixture.locate(p)[0] for p in range(6)]
    assert [vlm_synth.SOURCES[i] for i in batch["source"]] == names
    family = vlm_family.FAMILY.configured(ml_collections.ConfigDict(
        {"data": {"benchmark": "vlm_synth"}}))  # fmt: skip
    assert "source" in family.batch_keys and family.sources == vlm_synth.SOURCES
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(*batch["tokens"].shape, TOKENIZER.vocab_size))
    got = vlm_family.source_losses(jnp.asarray(logits, jnp.float32), batch, family.sources)
    for name in vlm_synth.SOURCES:
        rows = [r for r, n in enumerate(names) if n == name]
        nll, count = 0.0, 0
        for r in rows:
            for t in np.flatnonzero(batch["loss_mask"][r, :-1]):
                z = logits[r, t]
                nll += np.log(np.exp(z - z.max()).sum()) + z.max() - z[batch["tokens"][r, t + 1]]
                count += 1
        want = nll / count if count else 0.0
        np.testing.assert_allclose(float(got[f"loss/{name}"]), want, rtol=1e-5, err_msg=name)
