"""Evaluation (spec §10): the subset rule, the metrics against an independent float64
reference, retrieval subsets, the Evaluator's batching and embedding caches, summaries."""

import dataclasses
import types

import numpy as np
import pytest

from fomo_jax import evaluate as ev
from fomo_jax import models, sharding
from fomo_jax import params as params_lib
from fomo_jax.data import fif, fif_synth, registry
from fomo_jax.models import clip
from fomo_jax.models.clip import CLIP_MEAN, CLIP_STD
from fomo_jax.tokenizer import ByteTokenizer
from tests.evaluation_reference import (
    assert_scores_agree,
    fragile,
    one_shot_reference,
    summary_bounds,
)

SMALL = dict(seed=3, image_size=24, train_per_class=6, test_per_class=3, pool_size=240,
             samples_per_shard=100, workers=1)  # fmt: skip
IMAGE_SIZE = 32  # the tiny model's
BATCH = 64
# Every fif_synth prompt and caption fits in 64 byte tokens. At the tiny model's default 16,
# prompts such as "A photo of the letter A." are cut to the same tokens, classes tie exactly and
# the argmax among them is decided by rounding alone.
CONTEXT = 64
TINY = models.get_config("tiny")
TINY = TINY.replace(text=dataclasses.replace(TINY.text, context_length=CONTEXT))


# ----------------------------------------------------------------------------- subsets


def _fscoco_like():
    """1,777 samples of 115 classes, ten of them with a single sample."""
    counts = np.full(115, 15)
    counts[:10] = 1
    counts[10:106] += 2
    assert counts.sum() == 1777
    return np.random.default_rng(0).permutation(np.repeat(np.arange(115), counts)), counts


@pytest.mark.parametrize(
    "targets,size",
    [
        (np.random.default_rng(1).permutation(np.repeat(np.arange(1000), 50)), 5000),  # ImageNet
        (np.zeros(5000, int), 500),  # MSCOCO
        (np.zeros(1000, int), 300),  # Flickr30k
        (_fscoco_like()[0], 300),  # FSCOCO
        (np.repeat(np.arange(10), [26, 28, 27, 30, 26, 28, 26, 27, 27, 27]), 272),  # Monkeys10
        (np.repeat(np.arange(200), 5), 400),  # 2C dominates: q = 2
    ],
)
def test_subset_sizes_follow_the_spec_examples(targets, size):
    idx = ev.subset_indices(targets, seed=0)
    assert idx.dtype == np.int64 and len(idx) == size
    assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < len(targets)


def test_subset_is_stratified():
    imagenet = np.random.default_rng(1).permutation(np.repeat(np.arange(1000), 50))
    assert np.all(np.bincount(imagenet[ev.subset_indices(imagenet, 0)]) == 5)
    fscoco, counts = _fscoco_like()
    per_class = np.bincount(fscoco[ev.subset_indices(fscoco, 0)], minlength=115)
    assert np.all(per_class >= np.minimum(2, counts))  # q = 300 // 115, then 80 filled
    assert np.all(per_class[:10] == 1)


def test_subset_is_fixed_by_the_seed():
    targets = np.random.default_rng(2).integers(0, 7, 4000)
    a, b = ev.subset_indices(targets, 5), ev.subset_indices(targets, 5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, ev.subset_indices(targets, 6))
    assert len(ev.subset_indices(np.zeros(0, int), 0)) == 0


def test_retrieval_sets_without_classes_count_as_one_class():
    numbered = np.arange(1000)  # Flickr30k's JSON numbers its images
    assert np.all(ev.subset_targets(registry.get("flickr30k"), numbered) == 0)
    assert np.all(ev.subset_targets(registry.get("mscoco"), np.zeros(9)) == 0)
    fscoco = _fscoco_like()[0]  # real class labels: stratified
    np.testing.assert_array_equal(ev.subset_targets(registry.get("fscoco"), fscoco), fscoco)
    np.testing.assert_array_equal(ev.subset_targets(registry.get("cifar10"), numbered), numbered)


# ----------------------------------------------------------------------------- metrics


def _reference_accuracy(image_emb, class_emb, targets):
    hits = 0
    for x, t in zip(image_emb.astype(np.float64), targets, strict=True):
        scores = [float(np.dot(x, c)) for c in class_emb.astype(np.float64)]
        hits += max(range(len(scores)), key=lambda c: (scores[c], -c)) == t
    return 100.0 * hits / len(targets)


def _stable_top(scores, k):
    """Indices of the k largest scores, the lower index first among equals."""
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))[:k]


def _reference_recall(image_emb, text_emb, owner, k):
    sim = image_emb.astype(np.float64) @ text_emb.astype(np.float64).T
    t2i = np.mean([owner[j] in _stable_top(list(sim[:, j]), k) for j in range(len(owner))])
    i2t = np.mean(
        [any(owner[j] == i for j in _stable_top(list(sim[i]), k)) for i in range(len(sim))]
    )
    return 100 * t2i, 100 * i2t


def test_accuracy_uses_absolute_class_indices():
    rng = np.random.default_rng(0)
    class_emb = ev._unit(rng.normal(size=(6, 8)))
    image_emb = rng.normal(size=(50, 8))
    targets = rng.integers(1, 6, 50)  # class 0 absent
    own = np.arange(6)[None, :] == targets[:, None]
    assert not np.any(fragile(image_emb @ class_emb.T, own, 1))  # no near tie to round either way
    expected = _reference_accuracy(image_emb, class_emb, targets)
    assert ev.classification_score(image_emb, class_emb, targets) == pytest.approx(expected)
    # A perfect classifier without class 0 in the set scores 100 (the reference's shift: 0).
    assert ev.classification_score(class_emb[targets], class_emb, targets) == 100.0


def test_accuracy_breaks_ties_towards_the_lower_class():
    class_emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # classes 0 and 1 identical
    image_emb = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert ev.classification_score(image_emb, class_emb, [0, 1]) == 50.0
    assert _reference_accuracy(image_emb, class_emb, np.array([0, 1])) == 50.0


@pytest.mark.parametrize("ties", [False, True])
def test_recall_matches_a_float64_reference(ties):
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 5, 40)  # several captions per image, varying
    owner = rng.permutation(np.repeat(np.arange(40), counts))  # not even contiguous
    if ties:  # small dyadic vectors: every dot product exact, many exact ties
        image_emb = rng.integers(0, 2, (40, 4)) / 2
        text_emb = rng.integers(0, 2, (len(owner), 4)) / 2
    else:
        image_emb = rng.normal(size=(40, 16))
        text_emb = image_emb[owner] + rng.normal(size=(len(owner), 16))
        sim, own = image_emb @ text_emb.T, owner[None, :] == np.arange(40)[:, None]
        for k in (1, 5):  # no near tie to round either way
            assert not np.any(fragile(sim, own, k)) and not np.any(fragile(sim.T, own.T, k))
    scores = ev.retrieval_scores(image_emb, text_emb, owner, ks=(1, 5))
    for k in (1, 5):
        t2i, i2t = _reference_recall(image_emb, text_emb, owner, k)
        assert scores[f"t2i@{k}"] == pytest.approx(t2i)
        assert scores[f"i2t@{k}"] == pytest.approx(i2t)
        assert scores[f"recall@{k}"] == pytest.approx((t2i + i2t) / 2)


def test_recall_ties_follow_a_stable_sort():
    # Images 0 and 1 are identical, so are captions 0 (of image 0) and 1 (of image 1): the
    # lower index wins every tie, so only image 0 and its caption are hits at k = 1.
    image_emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text_emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    scores = ev.retrieval_scores(image_emb, text_emb, [0, 1, 2], ks=(1, 2))
    assert scores["t2i@1"] == pytest.approx(200 / 3) and scores["i2t@1"] == pytest.approx(200 / 3)
    assert scores["t2i@2"] == 100.0 and scores["i2t@2"] == 100.0


def test_caption_subset_keeps_and_reindexes_the_captions_of_the_sampled_images():
    owner = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4])
    keep, new_owner = ev.caption_subset(owner, np.array([1, 2, 4]))
    np.testing.assert_array_equal(keep, [2, 3, 4, 5, 7, 8])
    np.testing.assert_array_equal(new_owner, [0, 1, 1, 1, 2, 2])


# ------------------------------------------------------------------ Evaluator on arrays


class IndexModel:
    """A perfect "model": an image embeds as the one-hot of the index written into its first
    pixel, a text as the one-hot of the index in its first two tokens."""

    dim = 1024

    def encode_image(self, pixels):
        u = np.rint((np.asarray(pixels) * CLIP_STD + CLIP_MEAN) * 255).astype(int)
        return np.eye(self.dim, dtype=np.float32)[u[:, 0, 0, 0] * 256 + u[:, 0, 0, 1]]

    def encode_text(self, tokens):
        tokens = np.asarray(tokens)
        return np.eye(self.dim, dtype=np.float32)[tokens[:, 0] * 256 + tokens[:, 1]]


def _coded_images(codes):
    codes = np.asarray(codes)
    images = np.zeros((len(codes), 8, 8, 3), np.uint8)
    images[..., 0] = (codes // 256)[:, None, None]
    images[..., 1] = (codes % 256)[:, None, None]
    return images


def _coded_tokens(codes):
    codes = np.asarray(codes)
    return np.stack([codes // 256, codes % 256, np.zeros_like(codes)], 1).astype(np.int32)


def test_evaluator_subsets_keep_retrieval_pairs_aligned():
    owner = np.repeat(np.arange(700), 1 + np.arange(700) % 3)
    pairs = ev.EvalSet("pairs", "evaluation", True, _coded_images(np.arange(700)),
                       _coded_tokens(owner), np.zeros(700, np.int64), owner)  # fmt: skip
    pairs.fix_subset(np.zeros(700), seed=0)
    targets = np.repeat(np.arange(1, 20), 4)  # class 0 has no test image
    classes = ev.EvalSet("classes", "adaptation", False, _coded_images(targets),
                         _coded_tokens(np.arange(20)), targets)  # fmt: skip
    classes.fix_subset(targets, seed=0)
    roles = {"pairs": types.SimpleNamespace(role="evaluation"),
             "classes": types.SimpleNamespace(role="adaptation")}  # fmt: skip
    evaluator = ev.Evaluator.from_sets([classes, pairs], roles, batch_size=BATCH)
    assert len(pairs.subset) == 300 and len(pairs.subset_captions) < len(owner)
    for subset in (True, False):
        results = evaluator.evaluate(IndexModel(), subset=subset)
        assert results == {"classes": {"accuracy": 100.0},
                           "pairs": {"recall@1": 100.0, "recall@5": 100.0}}  # fmt: skip
    assert evaluator.subset_manifest()["pairs"] == pairs.subset.tolist()


def test_embed_rows_runs_segments_through_fixed_size_batches():
    shapes = []

    def encode(x):
        shapes.append(x.shape)
        return x.astype(np.float32) + 1

    a, b = np.arange(50).reshape(25, 2), np.arange(100, 160).reshape(30, 2)
    segments = [(a, np.array([3, 1, 24])), (b, np.arange(30)), (a, np.arange(25)[::-1])]
    outputs = ev.embed_rows(encode, segments, batch_size=16)
    assert set(shapes) == {(16, 2)} and len(shapes) == 4  # 58 rows
    for (array, idx), out in zip(segments, outputs, strict=True):
        np.testing.assert_allclose(out, ev._unit(array[idx] + 1.0), rtol=1e-6)


# ------------------------------------------------------------- Evaluator on fif_synth


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fif_synth_eval"))
    fif_synth.generate(root, **SMALL)
    datasets = fif_synth.load_datasets(root)
    tokenizer = ByteTokenizer(CONTEXT)
    evaluator = ev.Evaluator(root, datasets, tokenizer, IMAGE_SIZE, batch_size=BATCH)
    return root, datasets, tokenizer, evaluator


@pytest.fixture(scope="module")
def model():
    return models.create_model(TINY, seed=0)


def test_evaluator_prepares_every_dataset_once(synth):
    _, datasets, _, evaluator = synth
    assert [s.key for s in evaluator.sets] == list(datasets)
    for s in evaluator.sets:
        info = datasets[s.key]
        assert s.images.shape == (info.num_test, IMAGE_SIZE, IMAGE_SIZE, 3)
        assert s.images.dtype == np.uint8
        expected = ev.subset_indices(np.zeros(info.num_test) if info.is_retrieval else s.targets, 0)
        np.testing.assert_array_equal(s.subset, expected)
        if s.retrieval:
            assert len(s.tokens) == len(s.owner) > info.num_test  # several captions each
        else:
            assert len(s.tokens) == info.num_classes
    objects = next(s for s in evaluator.sets if s.key == "synth_objects")
    assert len(objects.subset) == 300  # of 400
    assert set(evaluator.subset_manifest()) == set(datasets)


def test_full_evaluation_agrees_with_a_plain_reference(synth, model):
    """The batched evaluator, the one-shot `evaluate_datasets` (another batch size: another
    computation) and the float64 reference agree on every decision that is not within EPS of
    a tie: scores differ by at most the slack of the fragile ones (none on these inputs, but
    a rounding difference of another CPU may make a rare one)."""
    root, datasets, tokenizer, evaluator = synth
    results = evaluator.evaluate(model, subset=False)
    headlines = {k: ev.headline(v) for k, v in results.items()}
    one_shot, slack = one_shot_reference(model, root, datasets, tokenizer, IMAGE_SIZE)
    flat = ev.evaluate_datasets(model, root, datasets, tokenizer, IMAGE_SIZE)
    assert one_shot.keys() == set(datasets)
    for s in evaluator.sets:  # the inputs have a margin: distinct prompts, few near ties
        assert s.retrieval or len(np.unique(s.tokens, axis=0)) == len(s.tokens), s.key
        assert slack[s.key] <= 5.0, (s.key, slack[s.key])
    assert_scores_agree(headlines, one_shot, slack, "Evaluator vs reference")
    # Both agree with the reference on every decision but the fragile ones: so with each other.
    assert_scores_agree(flat, headlines, slack, "evaluate_datasets vs Evaluator")
    summary = evaluator.summary(results)
    for name, (low, high) in summary_bounds(one_shot, slack, datasets).items():
        assert low - 1e-9 <= summary[name] <= high + 1e-9, (name, summary[name], low, high)
    long = dict(A_KA="knowledge_accumulation", A_ZS="zero_shot_retention", GM="geometric_mean")
    short = ev.summarize(headlines, datasets)  # the same numbers by their short names
    assert short == pytest.approx({k: summary[v] for k, v in long.items()})
    subset = evaluator.evaluate(model, subset=True)
    assert set(subset["synth_pairs"]) == {"recall@1", "recall@5"}
    assert all(0 <= ev.headline(v) <= 100 for v in subset.values())


@pytest.fixture
def counted(monkeypatch):
    calls = {"image": 0, "text": 0}
    encode_image, encode_text = clip.CLIP.encode_image, clip.CLIP.encode_text

    def image(self, pixels):
        calls["image"] += 1
        return encode_image(self, pixels)

    def text(self, token_ids):
        calls["text"] += 1
        return encode_text(self, token_ids)

    monkeypatch.setattr(clip.CLIP, "encode_image", image)
    monkeypatch.setattr(clip.CLIP, "encode_text", text)

    def take():
        out = dict(calls)
        calls.update(image=0, text=0)
        return out

    return take


def _shifted(model, prefix):
    """A copy of `model` with every parameter under `prefix` nudged."""
    graphdef, params = params_lib.split(model)
    flat = params_lib.flatten(params)
    flat = {k: v * 1.01 if k.startswith(prefix) else v for k, v in flat.items()}
    return params_lib.merge(graphdef, params_lib.unflatten(flat))


def test_embeddings_are_reused_while_a_tower_is_unchanged(synth, counted):
    *_, evaluator = synth
    model = models.create_model(TINY, seed=1)
    first = evaluator.evaluate(model, subset=True)
    assert counted()["text"] > 0
    assert evaluator.evaluate(model, subset=True) == first
    assert counted() == {"image": 0, "text": 0}

    locked_text = _shifted(model, "image/")  # e.g. a locked-text method after a task
    evaluator.evaluate(locked_text, subset=True)
    subset_images = sum(len(s.subset) for s in evaluator.sets)
    assert counted() == {"image": -(-subset_images // BATCH), "text": 0}

    pairs = next(s for s in evaluator.sets if s.retrieval)
    evaluator.evaluate(locked_text, subset=False)  # class prompts reused, captions are new
    assert counted()["text"] == -(-len(pairs.tokens) // BATCH)

    locked_image = _shifted(locked_text, "text/")
    evaluator.evaluate(locked_image, subset=True)
    calls = counted()
    assert calls["text"] > 0 and calls["image"] == 0  # image tower unchanged: reused

    evaluator.evaluate(_shifted(locked_image, "logit_scale"), subset=True)  # no tower reads it
    assert counted() == {"image": 0, "text": 0}


# ------------------------------------------------------ decoded images on disk, on a mesh


def test_disk_images_read_exactly_the_rows_asked_for(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (37, 4, 5, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    disk = ev.DiskImages(str(tmp_path / "x.npy"))
    assert len(disk) == 37 and disk.shape == images.shape and disk.dtype == np.uint8
    for rows in ([3, 4, 5, 9, 10, 36], [36, 0, 1, 1, 7], [], np.arange(37)[::-1]):
        np.testing.assert_array_equal(disk[np.asarray(rows, np.int64)], images[rows])
    np.testing.assert_array_equal(disk[5:20:3], images[5:20:3])
    with pytest.raises(IndexError, match="x.npy"):
        disk[np.array([2, 37])]


def test_cached_images_equal_the_decoded_ones_and_are_decoded_once(synth, tmp_path, monkeypatch,
                                                                    caplog):  # fmt: skip
    root, datasets, *_ = synth
    split = fif.load_split(root, "synth_objects", "test", datasets=datasets)
    want = ev.decode_images(split, IMAGE_SIZE, batch_size=48)
    disk = ev.cached_images(split, "synth_objects", IMAGE_SIZE, str(tmp_path), batch_size=48)
    assert isinstance(disk, ev.DiskImages) and len(disk) == len(want) == len(split)
    np.testing.assert_array_equal(disk[np.arange(len(disk))], want)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(ev, "_decoded_batches", no_decoding)
    with caplog.at_level("INFO"):
        again = ev.cached_images(split, "synth_objects", IMAGE_SIZE, str(tmp_path))
    assert again.path == disk.path and "decoded images read from" in caplog.text
    # Another image size is another file.
    monkeypatch.undo()
    other = ev.cached_images(split, "synth_objects", 24, str(tmp_path), batch_size=48)
    assert other.path != disk.path and other.shape == (len(split), 24, 24, 3)


def test_an_evaluator_on_a_mesh_with_images_on_disk_embeds_as_the_plain_one(synth, model,
                                                                            tmp_path):  # fmt: skip
    """Batches split over every device of the mesh, weights placed by the CLIP rules, images
    read from disk: the same embeddings as the in-memory evaluator (float32 rounding apart).
    The test process has one device; 2 processes x 2 devices run it in test_multihost.py."""
    root, datasets, tokenizer, plain = synth
    mesh = sharding.make_mesh(data=-1, fsdp=1)
    split = ev.Evaluator(root, datasets, tokenizer, IMAGE_SIZE, batch_size=BATCH, mesh=mesh,
                         cache_dir=str(tmp_path))  # fmt: skip
    assert all(isinstance(s.images, ev.DiskImages) for s in split.sets)
    assert len(split.placement.rows) == BATCH  # one process: every row of a batch is its own
    for got, want in zip(split._image_group(model, subset=False),
                         plain._image_group(model, subset=False), strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    texts = [(s, np.arange(len(s.tokens))) for s in split.sets]
    got = split._text_group(model, *zip(*texts, strict=True), "text")
    want = plain._text_group(model, *zip(*texts, strict=True), "text")
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5)
    assert split.evaluate(model, subset=True).keys() == plain.evaluate(model, subset=True).keys()


# ---------------------------------------------------------------------------- summaries


def test_headline_metrics():
    roles = {"a": "adaptation", "b": "adaptation", "r": "adaptation", "e": "evaluation"}
    datasets = {k: types.SimpleNamespace(role=r) for k, r in roles.items()}
    results = {
        "a": {"accuracy": 40.0},
        "b": {"accuracy": 20.0},
        "r": {"recall@1": 1.0, "recall@5": 30.0},  # R@5 is the headline
        "e": {"accuracy": 90.0},
    }
    summary = ev.headline_metrics(results, datasets)
    assert summary["knowledge_accumulation"] == pytest.approx(30.0)
    assert summary["zero_shot_retention"] == pytest.approx(90.0)
    assert summary["geometric_mean"] == pytest.approx(np.sqrt(30.0 * 90.0))


@pytest.mark.parametrize(
    "values,area",
    [([42.0] * 5, 42.0), ([0, 100], 50.0), ([0, 100, 0], 50.0), ([10, 20, 30, 40], 25.0),
     ([7.0], 7.0)],
)  # fmt: skip
def test_area_under_trajectory(values, area):
    assert ev.area_under_trajectory(values) == pytest.approx(area)


def test_area_under_trajectory_needs_a_point():
    with pytest.raises(ValueError):
        ev.area_under_trajectory([])
