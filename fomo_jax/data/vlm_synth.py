"""A synthetic vision-language world (spec vlm.md §4.2 and its corrections): pictures, a
knowledge base, a template grammar, the training sources of a VLM and its evaluation items.

Everything is numpy, seeded and deterministic: an example is a pure function of (world seed,
source, index) (`World.example`), so a stream of them is a pure function of positions.

**Pictures** (32 px): 1-4 objects, each a colour (8), a shape and a cell of a 3 x 3 grid, on a
noisy grey background; θ0 knows the `BASE_SHAPES`, the stream brings `NEW_SHAPES`. A *sign*
carries a two-digit code in a 3 x 5 pixel font (the reading task). Pictures are drawn with
numpy masks, with a little jitter of position and size.

**Knowledge base**: `ENTITIES` named creatures; each is pictured as one (colour, shape) look and
has three facts: where it lives, what it eats, what it likes. The *likes* facts are held out
(correction 8): they appear only in LM-pretraining text (`lm_text`), never in pairs, documents,
SFT or text-only instruction data, so text retention measures what the LM kept, not replay.

**Vocabulary**: a closed word-level vocabulary of the grammar (correction 2; ~4x shorter
sequences than bytes): specials (pad 0, ⟨eos⟩, ⟨eou⟩, ⟨image⟩), punctuation, digits and the
grammar's words (`WordTokenizer`). The vocabulary is the same for every world seed.

**Sources** (`SOURCES`; each an `vlm_batches.Example` with the §3.2 supervision):
- `lm_text`: LM pretraining paragraphs: every fact (held-out ones included), looks, scene
  sentences, arithmetic, and text binding episodes with nonce words.
- `lm_text_open`: the same generator without the held-out facts: the text later stages and
  the stream may replay without replaying the text-retention test.
- `pairs`: ⟨image⟩ short caption ("a red circle and a blue square.").
- `documents`: 2-3 images, each before a sentence that weakly refers to it, followed by
  sentences of the LM-text generator (no held-out fact), at least 5x the text per image of
  `pairs`; 15% of them are binding episodes ("⟨image⟩ this is a dax . ⟨image⟩ ...").
- `docs_pairs` (VILA's MMC4-pairs): each image of a document with the sentence after it.
- `reordered`: the same documents with every image first.
- `vqa`: SFT conversations on θ0's skills (colour, shape, position, describe).
- `text_instr`: text-only instructions (arithmetic, repetition, facts that are not held out).
- the stream's skills: `count`, `new_shapes`, `reading`, `knowledge` (SFT conversations plus
  pairs whose captions state the skill's answer).

**Evaluation items** (`World.eval_items(kind, count)`): fixed prompts with their answers for
the VQA types (`colour`, `shape`, `position`, `count`, `new_shapes`, `reading`, `knowledge`),
`caption` (scene descriptions, scored by slot F1 over (colour, shape, position) triples), the
held-out `facts` (multiple choice over the relation's values by option log-likelihood, and cloze)
and `binding` episodes (k-shot nonce binding). Evaluation items are drawn from their own index
range, disjoint from training examples' draws.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import numpy as np

from fomo_jax.data import vlm_batches as vb

VERSION = 2  # of the generator: part of every cache key made from the world's data
IMAGE_SIZE = 32

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30),
    "white": (250, 250, 250), "black": (15, 15, 15),
}  # fmt: skip
BASE_SHAPES = ("square", "circle", "triangle", "cross")
NEW_SHAPES = ("diamond", "ring")
POSITIONS = ("top left", "top", "top right", "left", "middle", "right", "bottom left", "bottom",
             "bottom right")  # fmt: skip
HOMES = ("north", "south", "east", "west")
FOODS = ("berries", "fish", "seeds", "leaves")
WEATHERS = ("rain", "sun", "snow", "wind")  # the held-out relation's values
NUMBER_WORDS = ("one", "two", "three", "four")
RELATIONS = {"lives": HOMES, "eats": FOODS, "likes": WEATHERS}
HELD_OUT_RELATION = "likes"


def _nonce_words(count: int) -> tuple[str, ...]:
    """Pronounceable nonce words (consonant-vowel-consonant-vowel-consonant), fixed for every
    world so the vocabulary is too."""
    rng = np.random.default_rng(20261203)
    words: list[str] = []
    while len(words) < count:
        c, v = "bdfgklmnprstvz", "aeiou"
        word = "".join(rng.choice(list(s)) for s in (c, v, c, v, c))
        if word not in words:
            words.append(word)
    return tuple(words)


ENTITIES = 24
NONCE_WORDS = _nonce_words(ENTITIES + 40)
ENTITY_NAMES = NONCE_WORDS[:ENTITIES]
BINDING_WORDS = NONCE_WORDS[ENTITIES:]  # fresh labels of binding episodes

SPECIAL_TOKENS = ("<pad>", "<eos>", "<eou>", "<image>")
_GRAMMAR_WORDS = """
a an the is are and at of in on with there this that it its what which where how many who
colour shape called lives live eats eat likes like sign says written image picture describe
here we see something thing things one two three four object objects so then next also
plus minus say again please answer User Assistant north south east west berries fish seeds
leaves rain sun snow wind top bottom left right middle creature creatures find you can
number numbers read has does
""".split()
VOCAB: tuple[str, ...] = tuple(dict.fromkeys(
    [*SPECIAL_TOKENS, ".", ",", "?", ":", *[str(d) for d in range(10)], *_GRAMMAR_WORDS,
     *COLOURS, *BASE_SHAPES, *NEW_SHAPES, *NONCE_WORDS]
))  # fmt: skip
SPECIALS = vb.Specials(image=VOCAB.index("<image>"), eos=VOCAB.index("<eos>"),
                       eou=VOCAB.index("<eou>"), pad=0)  # fmt: skip
_WORD = re.compile(r"[A-Za-z]+|[0-9]|[.,?:]")


class WordTokenizer:
    """The world's closed word-level vocabulary (`VOCAB`): words, digits and punctuation are
    tokens; a word outside the grammar is an error naming it."""

    vocab_size = len(VOCAB)
    pad_id, eos_id, eou_id, image_id = 0, SPECIALS.eos, SPECIALS.eou, SPECIALS.image

    def __init__(self):
        self.ids = {word: i for i, word in enumerate(VOCAB)}

    def encode(self, text: str) -> list[int]:
        words = _WORD.findall(text)
        if "".join(words) != re.sub(r"\s+", "", text):
            raise ValueError(f"text {text!r} has characters outside the world's grammar")
        try:
            return [self.ids[w] for w in words]
        except KeyError as e:
            raise ValueError(f"word {e.args[0]!r} (in {text!r}) is not in the world's "
                             "vocabulary") from None  # fmt: skip

    def decode(self, ids) -> str:
        """The text of `ids`; specials other than padding appear by name (e.g. "<image>")."""
        words = [VOCAB[int(i)] for i in ids if int(i) != self.pad_id]
        return re.sub(r" ([.,?:])", r"\1", " ".join(words))

    def __call__(self, texts):  # the families' Tokenizer protocol (not used for training)
        return [self.encode(t) for t in texts]


# ---------------------------------------------------------------------------------- pictures

_FONT = {  # 3 x 5 digits, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001111",
}  # fmt: skip


def _rng(seed: int, *parts) -> np.random.Generator:
    words = [seed] + [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    return np.random.default_rng(words)


def _mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape `shape` on coordinates normalised to its radius (|u|, |v| <= 1 inside)."""
    r = np.sqrt(u * u + v * v)
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.85
    if shape == "circle":
        return r <= 1.0
    if shape == "triangle":  # apex up
        return (v <= 0.9) & (abs(u) <= (v + 1.0) / 1.9)
    if shape == "cross":
        return ((abs(u) <= 0.33) & (abs(v) <= 1)) | ((abs(v) <= 0.33) & (abs(u) <= 1))
    if shape == "diamond":
        return abs(u) + abs(v) <= 1.05
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    raise ValueError(f"unknown shape {shape!r}")


@dataclasses.dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    cell: int  # 0..8, row-major over the 3 x 3 grid


def _canvas(rng) -> np.ndarray:
    grey = rng.integers(100, 160)
    return np.clip(grey + rng.normal(0, 8, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255)


def draw(things, rng) -> np.ndarray:
    """uint8 [32, 32, 3]: the objects of `things` in their cells."""
    image = _canvas(rng)
    cell = IMAGE_SIZE / 3
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    for thing in things:
        row, col = divmod(thing.cell, 3)
        cy = (row + 0.5) * cell + rng.uniform(-0.8, 0.8)
        cx = (col + 0.5) * cell + rng.uniform(-0.8, 0.8)
        radius = cell * rng.uniform(0.38, 0.46)
        inside = _mask(thing.shape, (x - cx) / radius, (y - cy) / radius)
        image[inside] = COLOURS[thing.colour]
    return image.astype(np.uint8)


def draw_sign(code: str, rng) -> np.ndarray:
    """uint8 [32, 32, 3]: a white sign with `code` (digits) in black, 2 px per font pixel."""
    image = _canvas(rng)
    width = 8 * len(code) + 2
    top = int(rng.integers(4, IMAGE_SIZE - 16))
    left = int(rng.integers(1, IMAGE_SIZE - width))
    image[top : top + 14, left : left + width] = 245
    for n, digit in enumerate(code):
        bits = np.array([int(b) for b in _FONT[digit]], bool).reshape(5, 3)
        pixels = np.kron(bits, np.ones((2, 2), bool))
        y0, x0 = top + 2, left + 2 + 8 * n
        region = image[y0 : y0 + 10, x0 : x0 + 6]
        region[pixels] = 10
    return image.astype(np.uint8)


def _things(rng, count: int, shapes=BASE_SHAPES, colours=None) -> list[Thing]:
    cells = rng.choice(9, count, replace=False)
    colours = list(colours or COLOURS)
    return [Thing(str(rng.choice(colours)), str(rng.choice(shapes)), int(c)) for c in cells]


def caption(things) -> str:
    """The short caption of a scene: "a red circle and a blue square."."""
    return " and ".join(f"a {t.colour} {t.shape}" for t in things) + "."


def description(things) -> str:
    """The full scene description (caption slot F1's references): one sentence per object,
    in cell order: "a red circle at the top left. a blue square in the middle."."""
    parts = []
    for t in sorted(things, key=lambda t: t.cell):
        parts.append(f"a {t.colour} {t.shape} {_where(t.cell)}.")
    return " ".join(parts)


def _where(cell: int) -> str:
    position = POSITIONS[cell]
    return "in the middle" if position == "middle" else f"at the {position}"


_SLOT = re.compile(r"a (\w+) (\w+) (?:at the ([a-z ]+?)|in the (middle))\s*\.")


def slots(text: str) -> set[tuple[str, str, str]]:
    """The (colour, shape, position) triples a description states (unparsable parts ignored)."""
    found = set()
    for colour, shape, at, middle in _SLOT.findall(text):
        found.add((colour, shape, at or middle))
    return found


def slot_f1(prediction: str, reference: str) -> float:
    """F1 of the predicted scene's triples against the reference's (1 when both are empty)."""
    p, r = slots(prediction), slots(reference)
    if not p and not r:
        return 1.0
    hits = len(p & r)
    if not hits:
        return 0.0
    precision, recall = hits / len(p), hits / len(r)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------- the world

SOURCES = ("lm_text", "lm_text_open", "pairs", "documents", "docs_pairs", "reordered", "vqa",
           "text_instr", "count", "new_shapes", "reading", "knowledge")  # fmt: skip
# The stream's skills (a continual task each): its SFT conversations and captioned pictures.
SKILLS = ("count", "new_shapes", "reading", "knowledge")
# Evaluation kinds: VQA types (exact match), captions (slot F1), held-out facts, binding.
VQA_KINDS = ("colour", "shape", "position", "count", "new_shapes", "reading", "knowledge")
EVAL_KINDS = (*VQA_KINDS, "caption", "facts", "binding")
EVAL_OFFSET = 1 << 40  # evaluation items' indices: disjoint from any training index


@dataclasses.dataclass(frozen=True)
class Item:
    """One evaluation item: the prompt's segments (up to the answer), the answer text (to be
    followed by ⟨eou⟩ for conversations), and for multiple choice the option words."""

    segments: tuple
    answer: str
    options: tuple[str, ...] = ()
    kind: str = ""
    shots: int = 0  # binding: demonstrations before the query


class World:
    """The world of seed `seed`: which look and facts each entity has."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        rng = _rng(seed, "world")
        looks = [(c, s) for c in COLOURS for s in BASE_SHAPES]
        order = rng.permutation(len(looks))[:ENTITIES]
        self.looks = {name: looks[i] for name, i in zip(ENTITY_NAMES, order, strict=True)}
        self.facts = {
            name: {rel: str(rng.choice(values)) for rel, values in RELATIONS.items()}
            for name in ENTITY_NAMES
        }

    # ---- sentences ---------------------------------------------------------------------------
    def fact_sentence(self, name: str, relation: str) -> str:
        value = self.facts[name][relation]
        if relation == "lives":
            return f"the {name} lives in the {value}."
        return f"the {name} {relation} {value}."

    def look_sentence(self, name: str) -> str:
        colour, shape = self.looks[name]
        return f"the {name} is a {colour} {shape}."

    def held_out_facts(self) -> list[str]:
        """Sentences that only LM-pretraining text holds (the text-retention facts)."""
        return [self.fact_sentence(n, HELD_OUT_RELATION) for n in ENTITY_NAMES]

    def _arithmetic(self, rng) -> tuple[str, str]:
        a, b = (int(x) for x in rng.integers(0, 10, 2))
        if rng.random() < 0.5 or a < b:
            return f"what is {a} plus {b}?", " ".join(str(a + b))
        return f"what is {a} minus {b}?", str(a - b)

    def _sentence(self, rng, held_out: bool) -> str:
        """One sentence of the LM-text generator (held-out facts only if `held_out`)."""
        kind = rng.choice(["fact", "look", "scene", "sum"], p=[0.5, 0.2, 0.15, 0.15])
        name = str(rng.choice(ENTITY_NAMES))
        if kind == "fact":
            relations = list(RELATIONS) if held_out else [r for r in RELATIONS
                                                         if r != HELD_OUT_RELATION]  # fmt: skip
            return self.fact_sentence(name, str(rng.choice(relations)))
        if kind == "look":
            return self.look_sentence(name)
        if kind == "scene":
            (thing,) = _things(rng, 1)
            return f"there is a {thing.colour} {thing.shape} {_where(thing.cell)}."
        question, answer = self._arithmetic(rng)
        return question.removeprefix("what is ").rstrip("?") + f" is {answer}."

    def _text_binding(self, rng) -> str:
        a, b = (str(w) for w in rng.choice(BINDING_WORDS, 2, replace=False))
        ca, cb = (str(c) for c in rng.choice(list(COLOURS), 2, replace=False))
        sentences = [f"a {a} is {ca}.", f"a {b} is {cb}."]
        query = str(rng.choice([a, b]))
        return " ".join(sentences) + f" so the {query} is {ca if query == a else cb}."

    # ---- examples ----------------------------------------------------------------------------
    def example(self, source: str, index: int) -> vb.Example:
        """Example `index` of `source`: a pure function of (seed, source, index)."""
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}; the world's sources are {SOURCES}")
        rng = _rng(self.seed, source, index)
        if source in ("docs_pairs", "reordered"):
            example = self._derived(source, index)
        else:
            example = getattr(self, f"_{source}")(rng)
        return dataclasses.replace(example, source=source)  # its source's name

    def _lm_text(self, rng, held_out: bool = True) -> vb.Example:
        count = int(rng.integers(3, 7))
        body = [self._text_binding(rng) if rng.random() < 0.15 else self._sentence(rng, held_out)
                for _ in range(count)]  # fmt: skip
        return vb.text(_within(body, LM_TEXT_TOKENS))

    def _lm_text_open(self, rng) -> vb.Example:
        return dataclasses.replace(self._lm_text(rng, held_out=False), source="lm_text_open")

    def _pairs(self, rng) -> vb.Example:
        things = _things(rng, int(rng.integers(1, 3)))
        return vb.pair(draw(things, rng), caption(things))

    def _document_parts(self, rng) -> list:
        if rng.random() < 0.15:  # a binding episode: a nonce word per shape, 3-5 pictures
            words = [str(w) for w in rng.choice(BINDING_WORDS, 2, replace=False)]
            shapes = [str(s) for s in rng.choice(BASE_SHAPES, 2, replace=False)]
            parts = []
            for _ in range(int(rng.integers(3, 6))):
                k = int(rng.integers(2))
                parts += [draw(_things(rng, 1, shapes=[shapes[k]]), rng), f"this is a {words[k]}."]
            return parts
        parts = []
        for _ in range(int(rng.integers(2, 4))):
            things = _things(rng, int(rng.integers(1, 3)))
            thing = things[0]
            hint = rng.choice([f"here we see something {thing.colour}.",
                               f"this one has a {thing.shape}.",
                               f"there is a {thing.shape} {_where(thing.cell)}."])  # fmt: skip
            text = _within(
                [hint] + [self._sentence(rng, False) for _ in range(int(rng.integers(5, 8)))],
                DOCUMENT_TOKENS,
            )
            parts += [draw(things, rng), text]
        return parts

    def _documents(self, rng) -> vb.Example:
        return vb.document(self._document_parts(rng))

    def _derived(self, source: str, index: int) -> vb.Example:
        parts = self._document_parts(_rng(self.seed, "documents", index))
        images = [p for p in parts if not isinstance(p, str)]
        texts = [p for p in parts if isinstance(p, str)]
        if source == "reordered":
            return dataclasses.replace(vb.document([*images, " ".join(texts)]), source=source)
        # docs -> pairs: one image of the document with the first sentence after it
        k = int(_rng(self.seed, source, index).integers(len(images)))
        first = texts[k].split(".")[0] + "."
        return dataclasses.replace(vb.pair(images[k], first), source=source)

    def _question(self, rng, kind: str):
        """(image, question, answer) of a VQA kind."""
        if kind == "colour":
            things = _things(rng, int(rng.integers(1, 4)))
            t = things[0]
            things = [x for x in things if x.shape != t.shape or x is t]
            return draw(things, rng), f"what colour is the {t.shape}?", t.colour
        if kind in ("shape", "new_shapes"):
            shapes = BASE_SHAPES if kind == "shape" else NEW_SHAPES
            things = _things(rng, int(rng.integers(1, 3)), shapes=shapes)
            t = things[0]
            things = [x for x in things if x.colour != t.colour or x is t]
            return draw(things, rng), f"what shape is the {t.colour} object?", t.shape
        if kind == "position":
            things = _things(rng, int(rng.integers(1, 3)))
            t = things[0]
            things = [x for x in things if x.shape != t.shape or x is t]
            return draw(things, rng), f"where is the {t.shape}?", POSITIONS[t.cell]
        if kind == "count":
            shape = str(rng.choice(BASE_SHAPES))
            n = int(rng.integers(1, 5))
            others = [s for s in BASE_SHAPES if s != shape]
            cells = rng.choice(9, n + int(rng.integers(0, 3)), replace=False)
            things = [Thing(str(rng.choice(list(COLOURS))),
                            shape if i < n else str(rng.choice(others)), int(c))
                      for i, c in enumerate(cells)]  # fmt: skip
            return draw(things, rng), f"how many {shape} objects are there?", str(n)
        if kind == "reading":
            code = "".join(str(d) for d in rng.integers(0, 10, 2))
            return draw_sign(code, rng), "what is written on the sign?", " ".join(code)
        if kind == "knowledge":
            name = str(rng.choice(ENTITY_NAMES))
            colour, shape = self.looks[name]
            image = draw([Thing(colour, shape, int(rng.integers(9)))], rng)
            if rng.random() < 0.5:
                return image, "what is this creature called?", name
            return image, "where does this creature live?", self.facts[name]["lives"]
        raise ValueError(kind)

    def _vqa(self, rng) -> vb.Example:
        kind = str(rng.choice(["colour", "shape", "position", "describe"]))
        if kind == "describe":
            things = _things(rng, int(rng.integers(1, 4)))
            return dataclasses.replace(
                vb.sft([("describe the image.", description(things))], draw(things, rng)),
                source="vqa")  # fmt: skip
        image, question, answer = self._question(rng, kind)
        return dataclasses.replace(vb.sft([(question, answer)], image), source="vqa")

    def _skill(self, rng, kind: str) -> vb.Example:
        image, question, answer = self._question(rng, kind)
        if rng.random() < 0.3:  # a captioned picture stating the answer
            if kind == "knowledge":
                sentence = (f"this creature is a {answer}." if "called" in question
                            else f"this creature lives in the {answer}.")  # fmt: skip
            else:
                sentence = {"count": f"there are {answer} objects.",
                            "new_shapes": f"this is a {answer}.",
                            "reading": f"the sign says {answer}."}[kind]  # fmt: skip
            return dataclasses.replace(vb.pair(image, sentence), source=kind)
        return dataclasses.replace(vb.sft([(question, answer)], image), source=kind)

    def _count(self, rng):
        return self._skill(rng, "count")

    def _new_shapes(self, rng):
        return self._skill(rng, "new_shapes")

    def _reading(self, rng):
        return self._skill(rng, "reading")

    def _knowledge(self, rng):
        return self._skill(rng, "knowledge")

    def _text_instr(self, rng) -> vb.Example:
        kind = rng.choice(["sum", "repeat", "fact"])
        if kind == "sum":
            question, answer = self._arithmetic(rng)
        elif kind == "repeat":
            answer = self._sentence(rng, False)
            question = f"say again : {answer}"
        else:
            name = str(rng.choice(ENTITY_NAMES))
            relation = str(rng.choice(["lives", "eats"]))
            question = (f"where does the {name} live?" if relation == "lives"
                        else f"what does the {name} eat?")  # fmt: skip
            answer = self.facts[name][relation]
        return dataclasses.replace(vb.sft([(question, answer)]), source="text_instr")

    # ---- evaluation --------------------------------------------------------------------------
    def eval_items(self, kind: str, count: int) -> list[Item]:
        """The first `count` evaluation items of `kind` (fixed for the world)."""
        if kind not in EVAL_KINDS:
            raise ValueError(f"unknown evaluation kind {kind!r}; expected one of {EVAL_KINDS}")
        items = []
        for index in range(count):
            rng = _rng(self.seed, "eval", kind, EVAL_OFFSET + index)
            items.append(self._eval_item(kind, index, rng))
        return items

    def _eval_item(self, kind, index, rng) -> Item:
        if kind in VQA_KINDS:
            image, question, answer = self._question(rng, kind)
            return Item(_prompt(question, image), answer, kind=kind)
        if kind == "caption":
            things = _things(rng, int(rng.integers(1, 4)))
            return Item(_prompt("describe the image.", draw(things, rng)), description(things),
                        kind=kind)  # fmt: skip
        if kind == "facts":
            name = ENTITY_NAMES[index % ENTITIES]
            return Item((vb.Text(f"the {name} likes", False),), self.facts[name]["likes"],
                        options=WEATHERS, kind=kind)  # fmt: skip
        # binding: k demonstrations of two fresh nonce words, then the query
        shots = (0, 1, 2, 4)[index % 4]
        words = [str(w) for w in rng.choice(BINDING_WORDS, 2, replace=False)]
        shapes = [str(s) for s in rng.choice(BASE_SHAPES, 2, replace=False)]
        segments = []
        first = int(rng.integers(2))
        for shot in range(shots):
            k = (first + shot) % 2
            segments += [vb.Image(draw(_things(rng, 1, shapes=[shapes[k]]), rng)),
                         vb.Text(f"this is a {words[k]}.", False)]  # fmt: skip
        k = int(rng.integers(2))
        segments += [vb.Image(draw(_things(rng, 1, shapes=[shapes[k]]), rng)),
                     vb.Text("this is a", False)]  # fmt: skip
        return Item(tuple(segments), words[k], options=tuple(words), kind=kind, shots=shots)


LM_TEXT_TOKENS = 72  # the most words and marks of an LM-text paragraph
DOCUMENT_TOKENS = 60  # ... of a document's text after one image


def _within(sentences: list[str], limit: int) -> str:
    """The first sentences whose tokens (words, digits, marks) stay within `limit` (at least
    one), joined: examples are bounded by construction."""
    kept, total = [], 0
    for sentence in sentences:
        total += len(_WORD.findall(sentence))
        if kept and total > limit:
            break
        kept.append(sentence)
    return " ".join(kept)


def _prompt(question: str, image) -> tuple:
    """The segments of a one-turn SFT prompt up to the answer (`vlm_batches.sft`'s format)."""
    segments = vb.sft([(question, "")], image).segments
    return segments[:-2]  # without the answer and its terminator


def training_texts(example: vb.Example) -> list[str]:
    """The text segments of an example (the held-out scan reads them)."""
    return [s.text for s in example.segments if isinstance(s, vb.Text)]
