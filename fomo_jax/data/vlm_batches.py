"""VLM examples, batches and the next-token loss (spec vlm.md §3 and its corrections).

One record type for every source: an `Example` is an ordered list of segments, each `Text`
(with a `loss` flag: whether its tokens are prediction targets) or `Image` (uint8 [H, W, 3]),
plus the name of its source. The sources build it with the supervision of spec §3.2:

- `pair(image, caption)`: ⟨image⟩ caption ⟨eos⟩; the caption and ⟨eos⟩ are targets.
- `document(parts)`: text and images in order (each image before its matched text); all text
  and the closing ⟨eos⟩ are targets.
- `sft(turns, image)`: "User: [⟨image⟩] question⟨eou⟩ Assistant: answer⟨eou⟩" per turn; every
  answer and its terminator are targets (the model learns to stop), nothing of the user's.
- `text(text)`: language-model text, all of it (and ⟨eos⟩) targets.

`collate` turns examples into static-shape arrays: `tokens` [B, T] with every image expanded
into `seq` copies of the image token (wrapped in ⟨wrapper⟩ tokens when the specials have one,
Idefics2 style, a doubled wrapper between adjacent images collapsed), `images` [B, N, H, W, 3]
with `image_valid` [B, N], `attention_mask` [B, T] (real tokens), `loss_mask` [B, T] and
`prefix_length` [B]. `loss_mask[t]` says whether the *target* at t, token t+1, is supervised
(correction 7): an image slot or wrapper, padding, or a token of an unsupervised segment never
is, and the last position has no target. `prefix_length` is the number of tokens before the
first target (the images and prompt that `prefix` fusion lets attend both ways).

`next_token_loss(logits, tokens, loss_mask, normalization)`: cross-entropy of each supervised
target, averaged over all supervised tokens of the batch (`"token"`, HF and VILA) or per
example first and then over the examples that have targets (`"example"`, big_vision); the
two weight long documents and short answers very differently, so a run records which.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZATIONS = ("token", "example")


@dataclasses.dataclass(frozen=True)
class Text:
    text: str
    loss: bool


@dataclasses.dataclass(frozen=True)
class Image:
    pixels: np.ndarray  # uint8 [H, W, 3]


@dataclasses.dataclass(frozen=True)
class Example:
    segments: tuple
    source: str


@dataclasses.dataclass(frozen=True)
class Specials:
    """Token ids of the VLM's special tokens; `wrapper` None: images are not wrapped."""

    image: int
    eos: int
    eou: int
    pad: int = 0
    wrapper: int | None = None


def pair(image: np.ndarray, caption: str) -> Example:
    return Example((Image(image), Text(caption, True), _EOS), "pairs")


def document(parts: Sequence[str | np.ndarray]) -> Example:
    segments = [Text(p, True) if isinstance(p, str) else Image(p) for p in parts]
    return Example((*segments, _EOS), "documents")


def sft(turns: Sequence[tuple[str, str]], image: np.ndarray | None = None) -> Example:
    """`turns`: (question, answer) pairs; the image, if any, opens the first question."""
    segments = []
    for number, (question, answer) in enumerate(turns):
        segments.append(Text("User: ", False))
        if image is not None and number == 0:
            segments.append(Image(image))
        segments += [Text(question, False), _EOU_PROMPT, Text("Assistant: ", False),
                     Text(answer, True), _EOU_TARGET]  # fmt: skip
    return Example(tuple(segments), "sft")


def text(body: str) -> Example:
    return Example((Text(body, True), _EOS), "text")


class _Special(Text):
    """A special token standing for `text`; `collate` maps it to its id."""


_EOS = _Special("<eos>", True)
_EOU_PROMPT = _Special("<eou>", False)  # ends a user turn: not a target
_EOU_TARGET = _Special("<eou>", True)  # ends an answer: a target
EOU_TARGET = _EOU_TARGET  # for prompts built segment by segment (evaluation items)


def _tokens(example: Example, encode: Callable[[str], list[int]], specials: Specials,
            seq: int) -> tuple[list[int], list[bool], list[np.ndarray]]:  # fmt: skip
    """(ids, supervised per id, images) of one example."""
    ids, supervised, images = [], [], []
    for segment in example.segments:
        if isinstance(segment, Image):
            wrap = [specials.wrapper] if specials.wrapper is not None else []
            shared = wrap and ids and ids[-1] == specials.wrapper  # adjacent images share one
            block = ([] if shared else wrap) + [specials.image] * seq + wrap
            ids += block
            supervised += [False] * len(block)
            images.append(np.asarray(segment.pixels, np.uint8))
        elif isinstance(segment, _Special):
            ids.append({"<eos>": specials.eos, "<eou>": specials.eou}[segment.text])
            supervised.append(segment.loss)
        else:
            piece = list(encode(segment.text))
            ids += piece
            supervised += [segment.loss] * len(piece)
    return ids, supervised, images


def collate(examples: Sequence[Example], encode: Callable[[str], list[int]], specials: Specials,
            seq: int, length: int, max_images: int, image_size: int) -> dict:  # fmt: skip
    """Static-shape arrays of `examples` (see the module docstring). An example longer than
    `length` tokens or with more than `max_images` images is an error naming it."""
    batch = len(examples)
    out = dict(
        tokens=np.full((batch, length), specials.pad, np.int32),
        attention_mask=np.zeros((batch, length), bool),
        loss_mask=np.zeros((batch, length), bool),
        prefix_length=np.zeros(batch, np.int32),
        images=np.zeros((batch, max_images, image_size, image_size, 3), np.uint8),
        image_valid=np.zeros((batch, max_images), bool),
    )
    for row, example in enumerate(examples):
        ids, supervised, images = _tokens(example, encode, specials, seq)
        where = f"example {row} ({example.source})"
        if len(ids) > length:
            raise ValueError(f"{where} has {len(ids)} tokens; the batch holds {length}")
        if len(images) > max_images:
            raise ValueError(f"{where} has {len(images)} images; the batch holds {max_images}")
        for number, image in enumerate(images):
            if image.shape != (image_size, image_size, 3):
                raise ValueError(f"{where}: image {number} is {image.shape}, expected "
                                 f"{(image_size, image_size, 3)}")  # fmt: skip
            out["images"][row, number] = image
            out["image_valid"][row, number] = True
        n = len(ids)
        out["tokens"][row, :n] = ids
        out["attention_mask"][row, :n] = True
        out["loss_mask"][row, : n - 1] = supervised[1:]  # position t predicts token t + 1
        targets = np.flatnonzero(supervised[1:])
        out["prefix_length"][row] = targets[0] + 1 if len(targets) else n
    return out


def next_token_loss(logits, tokens, loss_mask, normalization: str = "token"):
    """Mean cross-entropy of the supervised next tokens (float32 scalar); see the docstring."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}; expected one of {NORMALIZATIONS}")
    logits = jnp.asarray(logits, jnp.float32)[:, :-1]
    targets = jnp.asarray(tokens)[:, 1:]
    mask = jnp.asarray(loss_mask, jnp.float32)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * mask
    if normalization == "token":
        return nll.sum() / jnp.maximum(mask.sum(), 1.0)
    per_row, count = nll.sum(axis=1), mask.sum(axis=1)
    has = count > 0
    per_example = jnp.where(has, per_row / jnp.maximum(count, 1.0), 0.0)
    return per_example.sum() / jnp.maximum(has.sum(), 1)
