"""An independent float64 zero-shot evaluation for the evaluation tests, and the tolerance its
comparisons need: accuracies and recalls are counts of argmax / top-k decisions, and a
decision near a tie may go either way in another computation of the same scores (other
batches, float32 instead of float64, another CPU's kernels). Such decisions are counted, and
a score may differ from the reference by what they could move it, never by more."""

import numpy as np

from fomo_jax.data import fif, pipeline, registry
from fomo_jax.models.clip import CLIP_MEAN, CLIP_STD

# Decisions within EPS of a tie are fragile. EPS is 250 times the largest cosine-score error
# measured between the Evaluator's float32 scores and this float64 reference on the fif_synth
# sets of tests/test_evaluate.py (4e-7: float32 embeddings, 32-dim float32 dot products).
EPS = 1e-4


def fragile(sim, own, k):
    """Queries (rows of `sim`) whose hit@k a change of every score by less than EPS / 2 could
    flip. A query is a hit when fewer than k other candidates rank above its best own one
    (`own`: [queries, candidates] bool); such a change only reorders candidates within EPS of
    that best score, so the outcome is fixed unless the candidates above it by more than EPS
    are fewer than k and, with those within EPS, reach k."""
    best = np.max(np.where(own, sim, -np.inf), axis=1, keepdims=True)
    above = np.sum(~own & (sim > best + EPS), axis=1)
    near = np.sum(~own & (np.abs(sim - best) <= EPS), axis=1)
    return (above < k) & (above + near >= k)


def one_shot_reference(model, root, datasets, tokenizer, image_size):
    """A plain evaluation: each split on its own, 64 images a batch, float64 numpy metrics.

    Returns ({dataset: accuracy or R@5}, {dataset: slack}): the slack is how far, in percent,
    the fragile decisions (see `fragile`) could move the score.
    """

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    scores, slack = {}, {}
    for key, info in datasets.items():
        split = fif.load_split(root, key, "test", datasets=datasets)
        batches = pipeline.EvalImages(pipeline.SplitSource(split), image_size, 64)
        pixels = lambda b: (b["images"] / 255.0 - CLIP_MEAN) / CLIP_STD  # noqa: E731
        image = unit(np.concatenate(
            [np.asarray(model.encode_image(pixels(b).astype(np.float32)))[b["valid"]]
             for b in batches]))  # fmt: skip
        if info.is_retrieval:
            texts = [c for r in split for c in r.captions]
            owner = np.repeat(np.arange(len(split)), [len(r.captions) for r in split])
            sim = image @ unit(model.encode_text(tokenizer(texts))).T
            top_images = np.argsort(-sim.T, axis=1, kind="stable")[:, :5]
            t2i = np.mean(np.any(top_images == owner[:, None], axis=1))
            top_texts = np.argsort(-sim, axis=1, kind="stable")[:, :5]
            i2t = np.mean(np.any(owner[top_texts] == np.arange(len(split))[:, None], axis=1))
            scores[key] = 50.0 * (t2i + i2t)
            own = owner[None, :] == np.arange(len(split))[:, None]  # [images, captions]
            slack[key] = 50.0 * (np.mean(fragile(sim.T, own.T, 5)) + np.mean(fragile(sim, own, 5)))
        else:
            names = registry.classnames(info, fif.default_info_dir(root))
            classes = unit(model.encode_text(tokenizer([info.prompt(n) for n in names])))
            sim = image @ classes.T
            scores[key] = 100.0 * np.mean(np.argmax(sim, axis=1) == split.targets)
            own = np.arange(len(names))[None, :] == split.targets[:, None]
            slack[key] = 100.0 * np.mean(fragile(sim, own, 1))
    return scores, slack


def summary_bounds(scores, slack, datasets):
    """{A_KA, A_ZS, GM by their long names: [low, high]} over every score within its slack,
    in plain numpy (unweighted means by role, GM = sqrt(A_KA * A_ZS), monotone in both)."""

    def mean(values, role):
        return np.mean([v for k, v in values.items() if datasets[k].role == role])

    ends = [{k: max(v - slack[k], 0.0) for k, v in scores.items()},
            {k: v + slack[k] for k, v in scores.items()}]  # fmt: skip
    ka = [mean(e, "adaptation") for e in ends]
    zs = [mean(e, "evaluation") for e in ends]
    gm = [np.sqrt(a * z) for a, z in zip(ka, zs, strict=True)]
    return {"knowledge_accumulation": ka, "zero_shot_retention": zs, "geometric_mean": gm}


def assert_scores_agree(got, want, slack, what=""):
    """Every dataset's score within its slack of the reference (float slack 1e-9)."""
    assert got.keys() == want.keys(), (what, sorted(got), sorted(want))
    for key, value in want.items():
        assert abs(got[key] - value) <= slack[key] + 1e-9, (what, key, got[key], value, slack[key])
