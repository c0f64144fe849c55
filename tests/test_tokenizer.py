"""Tests for fomo_jax.tokenizer.

No vocabulary can be downloaded, so a small CLIP-style BPE vocabulary is learnt
here from a tiny corpus and written in the three supported formats. Two
independent oracles check the ids:
  * transformers' CLIPTokenizer (Rust BPE, but its own normalizer), and
  * `OpenClipReference`, a line-by-line port of OpenCLIP's pure-Python
    SimpleTokenizer (ftfy + html cleaning, Python BPE), which is the behaviour
    fomo_jax must reproduce, including on texts where transformers differs.
"""

from __future__ import annotations

import collections
import gzip
import html
import json
import random
import unicodedata

import ftfy
import numpy as np
import pytest
import regex

from fomo_jax.tokenizer import ByteTokenizer, ClipTokenizer, load_tokenizer

CORPUS = """
A photo of a dog playing in the park. A photo of two cats sleeping on the sofa.
The quick brown fox jumps over the lazy dog! It's a sunny day, isn't it? I don't
know what they're doing, but we've seen it before and I'm sure you'll like it.
She'd say: "the best pictures are taken at 5 o'clock in the morning" -- maybe.
Photos, pictures, images and paintings of mountains, rivers, oceans, and forests.
Café au lait; naïve résumé of the über fancy crème brûlée. Tokyo 東京 and 日本.
Numbers like 2024, 3.14 and 100% are common in captions (e.g. 1080p, 4k, #tags).
People walking on the street near a red car, a blue bus, and a yellow taxi cab.
"""

# Texts where transformers and OpenCLIP agree (no ftfy/html effects).
COMPARE_TEXTS = [
    "A photo of a dog.",
    "hello, world!!! what's up???",
    "I don't think it's there; they're sure we've been, I'm, you'll, he'd",
    "Mixed CASE Text With Capitals AND shouting",
    "numbers 1234567890 and 3.14159, 100% and 1,000,000",
    "multiple   spaces\tand\ttabs\nand\n\nnewlines  \r\n end",
    "   leading and trailing whitespace   ",
    "unicode letters: café, naïve, über, crème brûlée, 日本, 東京タワー",
    "emoji 🐶🐱 and 👍🏽 ok ✨",
    "punctuation ... !? (brackets) [square] {curly} <angle> @#$^*_-+=~`|\\/",
    "",
    "a",
    "'s 't 're 've 'm 'll 'd",
    "zzzzzz qqqq xylophone jazz",
    "the " * 100,
    " ".join(f"word{i}" for i in range(60)),
]

# Texts that exercise OpenCLIP's cleaning. transformers has no ftfy/html step
# and gives different ids for all of them except the NFC one.
CLEANING_TEXTS = [
    "I don\u2019t like \u201ccurly\u201d quotes",  # ftfy uncurls quotes -> 't contraction
    "fish &amp; chips &lt;3",  # html.unescape
    "double &amp;lt;escaped&amp;gt;",  # html.unescape twice
    "<b>bold</b> &amp;lt;3",  # ftfy leaves entities when "<" is present
    "sch\u00c3\u00b6n",  # mojibake for "schön"
    "\u039f\u0394\u039f\u03a3 \u03a3\u039f\u03a6\u0399\u0391",  # Greek final sigma on lower()
    "\uff21\uff22\uff23 full width",  # ftfy fixes character width
    "caf\u0065\u0301 decomposed",  # NFC by ftfy
    "\ufb01sh",  # ftfy expands the fi ligature
]

# Literal special tokens: OpenCLIP maps them to their ids where its regex
# isolates them, so some of these rows hold a second SOT/EOT.
SPECIAL_TEXTS = [
    "<|ENDOFTEXT|>",  # special only after lower-casing
    "!<|endoftext|>",  # "!<|" is one punctuation run: OpenCLIP spells it out
    "a<|endoftext|>b",
    "x <|startoftext|> y",
    "<|endoftext|>",
    "<|endoftext|>!",
    "<|endoftext|><|endoftext|>",
    "<|startoftext|",
    "<|end",
]


# --------------------------------------------------------------------------
# Helpers: byte table, a greedy BPE learner, and a port of OpenCLIP.
# --------------------------------------------------------------------------
def byte_table():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=False))


BYTE_ENC = byte_table()
PAT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def openclip_clean(text):
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


def learn_bpe(corpus, num_merges):
    """Greedy BPE over byte-level symbols, last symbol of a word carrying </w>."""
    words = collections.Counter(
        "".join(BYTE_ENC[b] for b in w.encode("utf-8")) for w in PAT.findall(openclip_clean(corpus))
    )
    seqs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    known = set(BYTE_ENC.values()) | {s + "</w>" for s in BYTE_ENC.values()}
    merges = []
    while len(merges) < num_merges:
        pairs = collections.Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:], strict=False):
                pairs[a, b] += words[w]
        candidates = sorted(((-c, p) for p, c in pairs.items() if "".join(p) not in known))
        if not candidates:
            break
        a, b = best = candidates[0][1]
        merges.append(best)
        known.add(a + b)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = tuple(out)
    return merges


class OpenClipReference:
    """Port of open_clip.tokenizer.SimpleTokenizer (encode/__call__ only)."""

    def __init__(self, merges):
        vocab = list(BYTE_ENC.values())
        vocab = vocab + [v + "</w>" for v in vocab]
        vocab += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = dict(zip(vocab, range(len(vocab)), strict=False))
        self.bpe_ranks = dict(zip(merges, range(len(merges)), strict=False))
        self.cache = {t: t for t in ["<|startoftext|>", "<|endoftext|>"]}
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text):
        out = []
        for token in PAT.findall(openclip_clean(text)):
            token = "".join(BYTE_ENC[b] for b in token.encode("utf-8"))
            out.extend(self.encoder[t] for t in self.bpe(token).split(" "))
        return out

    def __call__(self, texts, context_length=77):
        result = np.zeros((len(texts), context_length), dtype=np.int64)
        for i, text in enumerate(texts):
            tokens = [self.sot] + self.encode(text) + [self.eot]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = self.eot
            result[i, : len(tokens)] = tokens
        return result


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipvocab")
    merges = learn_bpe(CORPUS, 200)
    assert len(merges) == 200
    header = "#version: 0.2\n"
    body = "".join(f"{a} {b}\n" for a, b in merges)

    gz = root / "openclip" / "bpe_simple_vocab_16e6.txt.gz"
    gz.parent.mkdir()
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write(header + body)

    hf = root / "hf"
    hf.mkdir()
    ref = OpenClipReference(merges)
    (hf / "vocab.json").write_text(json.dumps(ref.encoder, ensure_ascii=False), encoding="utf-8")
    (hf / "merges.txt").write_text(header + body, encoding="utf-8")

    from transformers import CLIPTokenizer as HFClip

    hf_tok = HFClip.from_pretrained(str(hf))
    tj_dir = root / "tokjson"
    hf_tok.save_pretrained(str(tj_dir))
    assert (tj_dir / "tokenizer.json").is_file()

    # Older tokenizers wrote merges as "a b" strings; check we read both.
    data = json.loads((tj_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["model"]["merges"] = [
        m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]
    ]
    str_json = root / "string_merges_tokenizer.json"
    str_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    return dict(
        root=root,
        merges=merges,
        gz=gz,
        hf=hf,
        tj_dir=tj_dir,
        tj=tj_dir / "tokenizer.json",
        str_json=str_json,
        ref=ref,
        hf_tok=hf_tok,
    )


@pytest.fixture(scope="module")
def tok(files):
    return ClipTokenizer.from_files(files["gz"])


# --------------------------------------------------------------------------
# 1. Against transformers and the OpenCLIP port
# --------------------------------------------------------------------------
def _check_row(row, eot):
    """EOT is the row max and only zeros follow its first occurrence."""
    n = int(np.flatnonzero(row == eot)[0]) + 1
    assert row.max() == eot
    assert (row[n:] == 0).all()
    return n


def test_matches_transformers(tok, files):
    hf_tok = files["hf_tok"]
    assert hf_tok.bos_token_id == tok.sot_id and hf_tok.eos_token_id == tok.eot_id
    ours = tok(COMPARE_TEXTS)
    theirs = np.array(
        hf_tok(COMPARE_TEXTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    )
    assert ours.shape == theirs.shape == (len(COMPARE_TEXTS), 77)
    for text, row, ref in zip(COMPARE_TEXTS, ours, theirs, strict=False):
        n = _check_row(row, tok.eot_id)
        assert row[:n].tolist() == ref[:n].tolist(), text
        assert (ref[n:] == hf_tok.pad_token_id).all()
    # the long texts really were truncated
    for i in (COMPARE_TEXTS.index("the " * 100), len(COMPARE_TEXTS) - 1):
        assert ours[i, -1] == tok.eot_id and (ours[i] != 0).all()
        assert tok.encode(COMPARE_TEXTS[i])[:75] == ours[i, 1:76].tolist()


def test_matches_openclip_reference(tok, files):
    texts = COMPARE_TEXTS + CLEANING_TEXTS + SPECIAL_TEXTS
    np.testing.assert_array_equal(tok(texts), files["ref"](texts))
    for t in texts:
        assert tok.encode(t) == files["ref"].encode(t), t


def test_fuzz_against_openclip_reference(tok, files):
    rng = random.Random(0)
    pool = list(
        "abcxyz ABC \t\n'.,!?&;<>|-_019\u00e9\u00fc\u00df\u65e5\u672c\U0001f436"
        "\U0001f44d\U0001f3fd\u2019\u201c\u03a3\u039f\u00a0\u3000\x85\ufb01\uff21\u0301"
    )
    pool += ["&amp;", "&lt;", "'s", "'ll", "<|endoftext|>", "<|startoftext|>", "\u00c3\u00b6"]
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(400)]
    # Random assigned code points. Unassigned ones (Cn) are excluded: which of
    # them count as letters depends on the Unicode version of the regex engine.
    chars = [c for c in map(chr, range(1, 0x30000)) if unicodedata.category(c) not in ("Cn", "Cs")]
    texts += ["".join(rng.choice(chars) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    np.testing.assert_array_equal(tok(texts), files["ref"](texts))


def test_literal_special_tokens(tok):
    a, b = tok.encode("a"), tok.encode("b")
    assert tok.encode("a<|endoftext|>b") == a + [tok.eot_id] + b
    assert tok.encode("<|StartOfText|>") == [tok.sot_id]
    assert tok.eot_id not in tok.encode("!<|endoftext|>")
    assert tok.eot_id not in tok.encode("<|endoftext")


def test_known_deviation_from_transformers(tok, files):
    """transformers has no ftfy: curly apostrophes do not become the 't token."""
    text = "don\u2019t"
    ours = tok.encode(text)
    theirs = files["hf_tok"](text, add_special_tokens=False)["input_ids"]
    assert ours == tok.encode("don't") and ours != theirs
    # transformers matches added tokens before lower-casing, OpenCLIP after.
    assert tok.encode("<|ENDOFTEXT|>") == [tok.eot_id]
    assert files["hf_tok"]("<|ENDOFTEXT|>", add_special_tokens=False)["input_ids"] != [tok.eot_id]


# --------------------------------------------------------------------------
# 2. File formats
# --------------------------------------------------------------------------
def test_all_formats_identical(files, tok):
    texts = COMPARE_TEXTS + CLEANING_TEXTS
    expected = tok(texts)
    for path in (
        files["gz"],
        files["gz"].parent,
        files["hf"],
        files["tj"],
        files["tj_dir"],
        files["str_json"],
        str(files["tj"]),
    ):
        other = ClipTokenizer.from_files(path)
        assert (other.vocab_size, other.sot_id, other.eot_id) == (
            tok.vocab_size,
            tok.sot_id,
            tok.eot_id,
        ), path
        np.testing.assert_array_equal(other(texts), expected, err_msg=str(path))
    assert isinstance(load_tokenizer(files["hf"]), ClipTokenizer)
    n = len(files["merges"])
    assert tok.vocab_size == 512 + n + 2
    assert (tok.sot_id, tok.eot_id) == (512 + n, 512 + n + 1)


def test_openclip_merge_limit(tmp_path):
    """OpenCLIP uses only the first 48894 merges of the file."""
    syms = list(BYTE_ENC.values())
    pairs = [(a, b) for a in syms for b in syms][: 48894 + 5]
    pairs[48894] = ("a", "b")  # first merge past the limit; must be ignored
    pairs = [p for i, p in enumerate(pairs) if i == 48894 or p != ("a", "b")]
    path = tmp_path / "big.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs))
    big = ClipTokenizer.from_files(path)
    assert big.vocab_size == 49408 and (big.sot_id, big.eot_id) == (49406, 49407)
    assert big.encode("ab") == [ord("a") - 33, 256 + ord("b") - 33]  # "a", "b</w>"


def test_openclip_file_header_is_skipped(tmp_path, files, tok):
    """The real bpe_simple_vocab_16e6.txt.gz begins with `"bpe_simple_vocab_16e6.txt#version:
    0.2` (a leading double quote, so no `#`); OpenCLIP skips the first line whatever it is."""
    body = "".join(f"{a} {b}\n" for a, b in files["merges"])
    path = tmp_path / "real_header.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + body)
    real = load_tokenizer(path)
    assert real.vocab_size == tok.vocab_size
    texts = COMPARE_TEXTS + SPECIAL_TEXTS
    np.testing.assert_array_equal(real(texts), tok(texts))
    # a first line that is a merge is dropped all the same
    path = tmp_path / "merge_first.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("q z\n" + body)
    first = load_tokenizer(path)
    assert first.vocab_size == tok.vocab_size
    np.testing.assert_array_equal(first(["qz zq"]), tok(["qz zq"]))


# --------------------------------------------------------------------------
# 3. Cleaning
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, clean",
    [
        ("fish &amp; chips", "fish & chips"),
        ("&amp;lt;b&amp;gt;", "<b>"),
        # ftfy skips entities in text that contains "<"; OpenCLIP's two
        # html.unescape calls then do the work.
        ("<i> &amp;lt;3", "<i> <3"),
        ("x<y &amp; z", "x<y & z"),
        ("&lt;3 &quot;hi&quot;", '<3 "hi"'),
        ("sch\u00c3\u00b6n", "sch\u00f6n"),
        ("  Many \t\n  SPACES\u00a0here  ", "many spaces here"),
        ("HeLLo WoRLD", "hello world"),
        ("don\u2019t", "don't"),
        ("\u039f\u0394\u039f\u03a3", "\u03bf\u03b4\u03bf\u03c2"),
        ("", ""),
    ],
)
def test_cleaning(tok, raw, clean):
    assert tok.clean(raw) == clean
    assert tok.encode(raw) == tok.encode(clean)


def test_cleaning_changes_ids(tok):
    assert tok.encode("fish &amp; chips") != tok.encode("fish amp chips")
    assert tok.encode("&amp;") == tok.encode("&")
    assert tok("A  B\n")[0].tolist() == tok("a b")[0].tolist()


# --------------------------------------------------------------------------
# 4. Layout: truncation, padding, dtype, shape
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make", [lambda f: ClipTokenizer.from_files(f["gz"]), lambda f: ByteTokenizer()]
)
def test_layout(files, make):
    t = make(files)
    ids = t.encode("a photo of a dog")
    n = len(ids)
    one = t("a photo of a dog")
    assert one.dtype == np.int32 and one.shape == (1, 77)
    assert one[0, : n + 2].tolist() == [t.sot_id] + ids + [t.eot_id]
    assert (one[0, n + 2 :] == 0).all()
    assert t(["x", "y", "z"]).shape == (3, 77)
    assert t([]).shape == (0, 77)
    # exact fit: no truncation; one too long: last kept token becomes EOT
    fit = t("a photo of a dog", context_length=n + 2)[0].tolist()
    assert fit == [t.sot_id] + ids + [t.eot_id]
    cut = t("a photo of a dog", context_length=n + 1)[0].tolist()
    assert cut == [t.sot_id] + ids[:-1] + [t.eot_id]
    short = t("a photo of a dog", context_length=4)[0].tolist()
    assert short == [t.sot_id] + ids[:2] + [t.eot_id]
    empty = t("", context_length=5)[0].tolist()
    assert empty == [t.sot_id, t.eot_id, 0, 0, 0]
    t16 = (
        type(t)(context_length=16)
        if isinstance(t, ByteTokenizer)
        else ClipTokenizer.from_files(files["gz"], context_length=16)
    )
    assert t16(["a b c"] * 2).shape == (2, 16)
    rows = t(COMPARE_TEXTS + CLEANING_TEXTS)
    assert (rows.max(axis=1) == t.eot_id).all() and t.eot_id == t.vocab_size - 1
    assert (rows[:, 0] == t.sot_id).all()
    for row in rows:  # exactly one EOT, zeros after
        assert (row == t.eot_id).sum() == 1
        _check_row(row, t.eot_id)


def test_batch_equals_single(tok):
    texts = COMPARE_TEXTS + CLEANING_TEXTS
    batch = tok(texts)
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(batch[i], tok(t)[0])


# --------------------------------------------------------------------------
# 5. ByteTokenizer
# --------------------------------------------------------------------------
def test_byte_tokenizer():
    t = load_tokenizer("bytes", context_length=32)
    assert isinstance(t, ByteTokenizer) and t.context_length == 32
    assert (t.pad_id, t.sot_id, t.eot_id, t.vocab_size) == (0, 257, 258, 259)
    text = "héllo wörld 日本 🐶 ok"
    ids = t.encode(text)
    assert ids == [b + 1 for b in text.encode("utf-8")]
    assert min(ids) >= 1 and max(ids) <= 256
    assert t.decode(ids) == text
    assert t.encode("  A\tB\n\nC ") == t.encode("a b c")
    row = t(text)[0]
    assert t.decode(row) == text
    long = t("x" * 100)[0]
    assert long.tolist() == [257] + [ord("x") + 1] * 30 + [258]


# --------------------------------------------------------------------------
# 6. decode
# --------------------------------------------------------------------------
def test_decode_round_trip(tok):
    for text in COMPARE_TEXTS[:-2] + CLEANING_TEXTS:
        clean = tok.clean(text)
        assert tok.decode(tok.encode(text)) == " ".join(PAT.findall(clean)), text
    text = "a photo of a dog"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok(text)[0]) == text
    assert tok.decode(tok("hi!")[0]) == "hi !"  # "!" is id 0, kept before EOT


# --------------------------------------------------------------------------
# 7. Errors
# --------------------------------------------------------------------------
def test_errors(tmp_path, files):
    missing = tmp_path / "nope" / "vocab.txt.gz"
    with pytest.raises(FileNotFoundError, match="nope"):
        ClipTokenizer.from_files(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(missing))
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        ClipTokenizer.from_files(empty)
    assert str(empty) in str(e.value) and "tokenizer.json" in str(e.value)
    half = tmp_path / "half"
    half.mkdir()
    (half / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        ClipTokenizer.from_files(half)
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    with pytest.raises(ValueError, match="junk.json"):
        ClipTokenizer.from_files(junk)
    badgz = tmp_path / "bad.txt.gz"
    with gzip.open(badgz, "wt") as f:
        f.write("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="bad.txt.gz"):
        ClipTokenizer.from_files(badgz)
    # a merge whose parts are not in the vocabulary
    bad = tmp_path / "badmerge"
    bad.mkdir()
    (bad / "vocab.json").write_text(json.dumps(files["ref"].encoder))
    (bad / "merges.txt").write_text("#version: 0.2\nzz qq\n")
    with pytest.raises(ValueError, match="badmerge"):
        ClipTokenizer.from_files(bad)
