"""Zero-shot evaluation of a CLIP on FiF-layout test splits (spec §10.2-10.3).

Classification: one prompt per class (the dataset's template), argmax over the dataset's own
label space, compared with the absolute class index (spec §10.2 [FIX]). Retrieval: every caption
of every image; R@k is the mean of text->image and image->text recall, where an image is a hit
for image->text if any of its captions is among the k nearest (stable sort on ties).
"""

from __future__ import annotations

import os

import numpy as np

from fomo_jax.data import fif, pipeline, registry
from fomo_jax.data.synthetic import normalize


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def image_embeddings(model, split: fif.Split, image_size: int, batch_size: int = 256):
    """L2-normalized image embeddings of a split under the test transform."""
    features = []
    for batch in pipeline.EvalImages(pipeline.SplitSource(split), image_size, batch_size):
        features.append(np.asarray(model.encode_image(normalize(batch["images"])))[batch["valid"]])
    return _unit(np.concatenate(features))


def classification_accuracy(model, split, prompts, tokenizer, image_size) -> float:
    """Top-1 accuracy in percent; `prompts[c]` is the text of class c."""
    class_emb = _unit(np.asarray(model.encode_text(tokenizer(list(prompts)))))
    predictions = np.argmax(image_embeddings(model, split, image_size) @ class_emb.T, axis=1)
    return 100.0 * float(np.mean(predictions == split.targets))


def retrieval_recall(model, split, tokenizer, image_size, k: int = 5) -> float:
    """(T2I R@k + I2T R@k) / 2 in percent, over all captions of every image."""
    texts = [c for r in split for c in r.captions]
    owner = np.repeat(np.arange(len(split)), [len(r.captions) for r in split])
    sim = (
        image_embeddings(model, split, image_size)
        @ _unit(np.asarray(model.encode_text(tokenizer(texts)))).T
    )
    nearest_images = np.argsort(-sim.T, axis=1, kind="stable")[:, :k]
    t2i = np.mean(np.any(nearest_images == owner[:, None], axis=1))
    nearest_texts = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    i2t = np.mean(np.any(owner[nearest_texts] == np.arange(len(split))[:, None], axis=1))
    return 50.0 * float(t2i + i2t)


def zero_shot_accuracy(model, images: np.ndarray, labels: np.ndarray, prompts, tokenizer) -> float:
    """Top-1 accuracy (a fraction) of normalized `images` against one prompt per class."""
    class_emb = _unit(np.asarray(model.encode_text(tokenizer(list(prompts)))))
    image_emb = np.asarray(model.encode_image(images))
    return float(np.mean(np.argmax(image_emb @ class_emb.T, axis=-1) == labels))


def evaluate_datasets(model, root, datasets, tokenizer, image_size, info_dir=None) -> dict:
    """{dataset key: accuracy or R@5} on the full test split of every dataset."""
    info_dir = info_dir or fif.default_info_dir(root)
    results = {}
    for key, info in datasets.items():
        split = fif.load_split(root, key, "test", info_dir, datasets=datasets)
        if info.is_retrieval:
            results[key] = retrieval_recall(model, split, tokenizer, image_size)
        else:
            names = registry.classnames(info, info_dir)
            prompts = [info.prompt(n) for n in names]
            results[key] = classification_accuracy(model, split, prompts, tokenizer, image_size)
    return results


def summarize(results: dict, datasets: dict) -> dict:
    """A_KA (mean over adaptation sets), A_ZS (over evaluation-only sets) and GM (spec §10.5)."""
    a_ka = float(np.mean([results[k] for k, d in datasets.items() if d.role == "adaptation"]))
    a_zs = float(np.mean([results[k] for k, d in datasets.items() if d.role == "evaluation"]))
    return dict(A_KA=a_ka, A_ZS=a_zs, GM=float(np.sqrt(a_ka * a_zs)))


def chance_levels(datasets: dict, root: str) -> dict:
    """Accuracy of guessing (percent); retrieval chance is k / number of images."""
    info_dir = fif.default_info_dir(root)
    levels = {}
    for key, info in datasets.items():
        if info.is_retrieval:
            levels[key] = 100.0 * 5 / info.num_test
        else:
            levels[key] = 100.0 / len(registry.classnames(info, os.path.join(info_dir)))
    return levels
