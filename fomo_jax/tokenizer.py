"""Text tokenizers for CLIP training.

`ClipTokenizer` reproduces OpenCLIP's `SimpleTokenizer` (the OpenAI CLIP BPE)
id for id, but runs the BPE in the HF `tokenizers` Rust library so that
tokenizing a large batch of captions is not the data-loading bottleneck. The
text cleaning (ftfy, HTML unescaping, whitespace collapse, lower-casing) stays
in Python because it must match OpenCLIP exactly and the Rust normalizers do
not: they have no ftfy, and `Lowercase` maps character by character (no
Greek final sigma), unlike Python's `str.lower`.

`ByteTokenizer` needs no vocabulary file, for synthetic runs and tests.

Both save themselves for the Hugging Face ecosystem (`save_pretrained`): the CLIP BPE as the
`vocab.json` + `merges.txt` that `transformers.CLIPTokenizer` reads, the byte tokenizer as a
`tokenizer.json` that the `tokenizers` library runs with exactly `ByteTokenizer`'s ids.

Both return `[n, context_length]` int32 arrays laid out as OpenCLIP does:
`[sot] + tokens + [eot]`, truncated with the last kept token forced to `eot`,
then zero padded. The EOT id is the largest id of the vocabulary, so the text
tower can pool at `argmax(ids)` without being told the sequence lengths.
"""

from __future__ import annotations

import functools
import gzip
import html
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# OpenCLIP keeps only this many merges of bpe_simple_vocab_16e6.txt.gz, so that
# 256 bytes + 256 bytes</w> + merges + 2 specials = 49408 ids.
OPENCLIP_NUM_MERGES = 49152 - 256 - 2
# CLIP's pre-tokenization regex. OpenCLIP compiles it case-insensitive, which
# is moot because the text is lower-cased before it is applied.
CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
OPENCLIP_FILE = "bpe_simple_vocab_16e6.txt.gz"

Texts = str | Iterable[str]

# The separators of Python's `str.split()` (`str.isspace`), which `whitespace_clean` collapses;
# the byte tokenizer's tokenizer.json spells them out because regex `\s` is another set.
PY_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Python's `str.lower` gives U+03A3 its final form ς when a cased letter precedes it and none
# follows, skipping case-ignorable characters on both sides (Unicode's Final_Sigma context, as
# CPython's handle_capital_sigma implements it); tokenizers' Lowercase maps character by
# character and always gives σ. The first non-ignorable character before Σ must be cased:
# `\K` starts the replaced match at Σ, and the possessive `*+` makes the lookahead test only
# the first non-ignorable character after it.
FINAL_SIGMA_PATTERN = (
    r"[\p{Cased}&&\P{Case_Ignorable}]\p{Case_Ignorable}*\K\x{03A3}"
    r"(?!\p{Case_Ignorable}*+\p{Cased})"
)
# The files save_pretrained may write; an export removes the ones its tokenizer does not write.
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


@functools.lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP map from bytes to printable characters.

    BPE symbols must be printable and whitespace-free so that merges files can
    be written as `a b` lines; this is the same table the `tokenizers`
    ByteLevel pre-tokenizer uses, which is why the Rust BPE gives CLIP's ids.
    """
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=False))


def whitespace_clean(text: str) -> str:
    # str.split() (not a regex) is what current OpenCLIP uses; it also splits
    # on the ASCII separators \x1c-\x1f, which ftfy has removed by then anyway.
    return " ".join(text.split())


def clip_clean(text: str) -> str:
    """OpenCLIP's default ("lower") cleaning, in OpenCLIP's order.

    ftfy repairs mojibake and also un-curls quotes, so `don’t` gets the `'t`
    contraction token as in the original CLIP training data. ftfy already
    decodes HTML entities, except in text containing `<`; there the two
    `html.unescape` calls handle captions escaped twice (`&amp;lt;`).
    """
    import ftfy  # imported lazily: only the file-based tokenizer needs it

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return whitespace_clean(text).strip().lower()


def _frame(rows: Sequence[Sequence[int]], sot: int, eot: int, context_length: int) -> np.ndarray:
    """Lay out `[sot] + row + [eot]` per row with OpenCLIP's truncation rule.

    When too long the sequence is cut and the last kept token overwritten by
    EOT (rather than dropping tokens before appending it), so every row has
    exactly one EOT and it is still the row's maximum.
    """
    if context_length < 1:
        raise ValueError(f"context_length must be >= 1, got {context_length}")
    out = np.zeros((len(rows), context_length), dtype=np.int32)
    for i, row in enumerate(rows):
        tokens = [sot, *row, eot]
        if len(tokens) > context_length:
            tokens = tokens[:context_length]
            tokens[-1] = eot
        out[i, : len(tokens)] = tokens
    return out


def _write_files(directory, files: dict[str, str]) -> list[str]:
    """Write text files into `directory` (created), each through a temporary name so a reader
    never sees half a file. Returns the names written."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for name, text in files.items():
        tmp = os.path.join(directory, name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(directory, name))
    return list(files)


def _as_list(texts: Texts) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"expected str texts, got {type(t).__name__}")
    return texts


class ClipTokenizer:
    """CLIP BPE tokenizer with OpenCLIP semantics and a Rust BPE core.

    Build it with `from_files`. A literal `<|startoftext|>` / `<|endoftext|>`
    in a caption becomes the special id, as in OpenCLIP, but only where CLIP's
    regex isolates it: in `"!<|endoftext|>"` the `!<|` is one punctuation run,
    so OpenCLIP (and this class, unlike transformers) spells it out in BPE.
    """

    pad_id = 0

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        context_length: int = 77,
        source: str = "<memory>",
    ):
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers

        for name in (SOT_TOKEN, EOT_TOKEN):
            if name not in vocab:
                raise ValueError(f"{source}: vocabulary has no {name!r} token")
        self.sot_id = int(vocab[SOT_TOKEN])
        self.eot_id = int(vocab[EOT_TOKEN])
        self.vocab_size = int(max(vocab.values())) + 1
        if self.eot_id != self.vocab_size - 1:
            # The text tower pools at argmax(ids); that only finds the EOT if
            # it is the largest id, as in every CLIP vocabulary.
            raise ValueError(
                f"{source}: {EOT_TOKEN!r} has id {self.eot_id}, expected the largest id "
                f"{self.vocab_size - 1}"
            )
        self.context_length = int(context_length)
        # Kept for save_pretrained; the Rust model does not give its merges back.
        self.vocab = {str(t): int(i) for t, i in vocab.items()}
        self.merges = [tuple(m) for m in merges]
        try:
            model = models.BPE(
                vocab=dict(vocab),
                merges=[tuple(m) for m in merges],
                end_of_word_suffix="</w>",
                continuing_subword_prefix="",
                fuse_unk=False,
                dropout=None,
            )
        except Exception as e:  # the Rust error says which merge is bad
            raise ValueError(f"{source}: invalid BPE vocabulary/merges: {e}") from e
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
                # The Split already produced CLIP's words; GPT-2's regex must not
                # re-split them, and CLIP has no prefix space.
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        self._tok = tok
        self._specials = {SOT_TOKEN: self.sot_id, EOT_TOKEN: self.eot_id}
        self._id_to_token = {int(i): t for t, i in vocab.items()}
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    # ------------------------------------------------------------------ API
    def clean(self, text: str) -> str:
        return clip_clean(text)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Texts) -> list[list[int]]:
        cleaned = [self.clean(t) for t in _as_list(texts)]
        if not cleaned:
            return []
        encs = self._tok.encode_batch_fast(cleaned, add_special_tokens=False)
        return [
            self._encode_with_specials(t) if "<|" in t else e.ids
            for t, e in zip(cleaned, encs, strict=False)
        ]

    def _encode_with_specials(self, text: str) -> list[int]:
        """Slow path for the rare caption that spells a special token.

        The Rust BPE would split `<|endoftext|>` into pieces, and registering
        it as an added token would also match it inside punctuation runs,
        where OpenCLIP does not. So walk CLIP's pre-tokens here instead.
        """
        ids: list[int] = []
        for piece, _ in self._tok.pre_tokenizer.pre_tokenize_str(text):
            if piece in self._specials:
                ids.append(self._specials[piece])
            else:
                ids.extend(t.id for t in self._tok.model.tokenize(piece))
        return ids

    def __call__(self, texts: Texts, context_length: int | None = None) -> np.ndarray:
        ctx = self.context_length if context_length is None else context_length
        return _frame(self.encode_batch(texts), self.sot_id, self.eot_id, ctx)

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of encode, also accepting a padded row from `__call__`.

        Id 0 is a real token ("!") in CLIP, so padding is recognised by
        position: everything from the first EOT on is dropped.
        """
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        text = "".join(self._id_to_token[i] for i in ids if i != self.sot_id)
        raw = bytearray(self._byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def save_pretrained(self, directory, context_length: int | None = None) -> list[str]:
        """Write the files `transformers.CLIPTokenizer.from_pretrained` reads: `vocab.json`,
        `merges.txt`, `tokenizer_config.json` and `special_tokens_map.json`.

        No `tokenizer.json`: its normalizers cannot express ftfy and HTML unescaping, so it
        could not tokenize exactly like this class; transformers builds its fast tokenizer from
        `vocab.json` + `merges.txt` instead (and so does `from_files`). Like openai/clip-vit-*,
        the HF side pads with `<|endoftext|>` where this class pads with 0; positions after the
        first EOT do not reach the pooled embedding (causal mask), so embeddings agree.
        Returns the names written.
        """
        ctx = self.context_length if context_length is None else int(context_length)
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        specials = {
            "bos_token": SOT_TOKEN,
            "eos_token": EOT_TOKEN,
            "unk_token": EOT_TOKEN,
            "pad_token": EOT_TOKEN,
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": ctx,
            **specials,
            "do_lower_case": True,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
        }
        files = {
            "vocab.json": json.dumps(self.vocab, ensure_ascii=False),
            "merges.txt": merges,
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(specials, indent=2),
        }
        return _write_files(directory, files)

    def __repr__(self) -> str:
        return f"ClipTokenizer(vocab_size={self.vocab_size}, context_length={self.context_length})"

    # --------------------------------------------------------- constructors
    @classmethod
    def from_files(cls, path: str | os.PathLike, context_length: int = 77) -> ClipTokenizer:
        """Load from an OpenCLIP merges `.txt.gz`, a HF `tokenizer.json`, or a
        directory with `tokenizer.json`, `vocab.json` + `merges.txt`, or
        `bpe_simple_vocab_16e6.txt.gz` (tried in that order)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            tj = os.path.join(path, "tokenizer.json")
            vj, mt = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
            gz = os.path.join(path, OPENCLIP_FILE)
            if os.path.isfile(tj):
                vocab, merges = _read_tokenizer_json(tj)
                src = tj
            elif os.path.isfile(vj) or os.path.isfile(mt):
                for f in (vj, mt):
                    if not os.path.isfile(f):
                        raise FileNotFoundError(
                            f"{path}: has {'merges.txt' if f == vj else 'vocab.json'} "
                            f"but not {os.path.basename(f)} (HF CLIP format needs both)"
                        )
                vocab, merges = _read_vocab_merges(vj, mt)
                src = path
            elif os.path.isfile(gz):
                vocab, merges = _read_openclip_gz(gz)
                src = gz
            else:
                raise FileNotFoundError(
                    f"{path}: directory has no tokenizer files; expected tokenizer.json, "
                    f"vocab.json + merges.txt, or {OPENCLIP_FILE}"
                )
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                magic = f.read(2)
            if magic == b"\x1f\x8b":
                vocab, merges = _read_openclip_gz(path)
            else:
                vocab, merges = _read_tokenizer_json(path)
            src = path
        else:
            raise FileNotFoundError(
                f"{path}: no such file or directory; expected an OpenCLIP merges .txt.gz, a "
                f"tokenizer.json, or a directory holding tokenizer files"
            )
        return cls(vocab, merges, context_length=context_length, source=src)


def _parse_merge_lines(
    lines: Iterable[str], source: str, *, skip_first: bool = False
) -> list[tuple[str, str]]:
    """The merges of a merges file; its first line is skipped if it is a `#version` header,
    or always with `skip_first` (OpenCLIP's rule)."""
    merges = []
    for n, line in enumerate(lines):
        if n == 0 and (skip_first or line.startswith("#")):  # "#version: 0.2" header
            continue
        parts = line.split()
        if not parts:  # trailing newline; OpenCLIP would even add "" to its vocab here
            continue
        if len(parts) != 2:
            raise ValueError(f"{source}: line {n + 1} is not a merge 'a b': {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_openclip_gz(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenCLIP's vocabulary is implicit: bytes, bytes</w>, one token per
    merge, then the two specials; the file only stores the merges."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{path}: not a gzip-compressed UTF-8 BPE merges file: {e}") from e
    # OpenCLIP drops the first line whatever it holds; the real file's is
    # `"bpe_simple_vocab_16e6.txt#version: 0.2` (with a leading double quote).
    merges = _parse_merge_lines(lines, path, skip_first=True)[:OPENCLIP_NUM_MERGES]
    if not merges:
        raise ValueError(f"{path}: no BPE merges found")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    # dict() keeps the last id of a duplicate, as OpenCLIP's encoder does.
    return dict(zip(tokens, range(len(tokens)), strict=False)), merges


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file: {e}") from e


def _read_tokenizer_json(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = _load_json(path)
    if _is_byte_tokenizer_json(data):  # it would load as a BPE that maps nothing right
        raise ValueError(
            f"{path}: is fomo_jax's byte tokenizer, not a CLIP BPE; load it with "
            "load_tokenizer (or tokenizer='bytes')"
        )
    model = data.get("model") if isinstance(data, dict) else None
    if (
        not isinstance(model, dict)
        or not isinstance(model.get("vocab"), dict)
        or not isinstance(model.get("merges"), list)
    ):
        raise ValueError(
            f"{path}: expected a HF tokenizer.json with model.vocab and "
            f"model.merges (or an OpenCLIP .txt.gz merges file)"
        )
    if model.get("type", "BPE") != "BPE" or model.get("end_of_word_suffix") not in (None, "</w>"):
        raise ValueError(
            f"{path}: not a CLIP BPE tokenizer (type={model.get('type')!r}, "
            f"end_of_word_suffix={model.get('end_of_word_suffix')!r})"
        )
    vocab = {str(k): int(v) for k, v in model["vocab"].items()}
    # Specials normally sit in model.vocab; fall back to added_tokens.
    for tok in data.get("added_tokens") or []:
        if tok.get("content") in (SOT_TOKEN, EOT_TOKEN):
            vocab.setdefault(tok["content"], int(tok["id"]))
    merges = []
    for m in model["merges"]:  # "a b" (tokenizers < 0.20) or ["a", "b"]
        parts = m.split(" ") if isinstance(m, str) else list(m)
        if len(parts) != 2:
            raise ValueError(f"{path}: bad merge entry {m!r}")
        merges.append((parts[0], parts[1]))
    return vocab, merges


def _read_vocab_merges(vocab_path: str, merges_path: str):
    vocab = _load_json(vocab_path)
    if not isinstance(vocab, dict):
        raise ValueError(f"{vocab_path}: expected a JSON object mapping token -> id")
    with open(merges_path, encoding="utf-8") as f:
        merges = _parse_merge_lines(f.read().split("\n"), merges_path)
    return {str(k): int(v) for k, v in vocab.items()}, merges


class ByteTokenizer:
    """File-free tokenizer for synthetic runs: one id per UTF-8 byte.

    Ids: 0 pad, byte b -> b + 1, then SOT 257 and EOT 258, so EOT is the
    largest id like CLIP's and the same text tower pooling works unchanged.
    """

    pad_id = 0
    sot_id = 257
    eot_id = 258
    vocab_size = 259
    pad_token = "<pad>"  # id 0's name in the exported tokenizer.json

    def __init__(self, context_length: int = 77):
        self.context_length = int(context_length)

    def clean(self, text: str) -> str:
        return whitespace_clean(text).lower()

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in self.clean(text).encode("utf-8")]

    def __call__(self, texts: Texts, context_length: int | None = None) -> np.ndarray:
        ctx = self.context_length if context_length is None else context_length
        rows = [self.encode(t) for t in _as_list(texts)]
        return _frame(rows, self.sot_id, self.eot_id, ctx)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        raw = bytes(i - 1 for i in ids if 1 <= i <= 256)
        return raw.decode("utf-8", errors="replace").strip()

    @classmethod
    def hf_vocab(cls) -> dict[str, int]:
        """The tokenizer.json vocabulary: pad, byte b as its ByteLevel symbol -> b + 1, SOT, EOT."""
        table = bytes_to_unicode()
        vocab = {cls.pad_token: cls.pad_id, **{table[b]: b + 1 for b in range(256)}}
        return {**vocab, SOT_TOKEN: cls.sot_id, EOT_TOKEN: cls.eot_id}

    def to_hf(self, context_length: int | None = None):
        """This tokenizer as a `tokenizers.Tokenizer` giving the same `[context_length]` rows.

        Normalizers redo `clean`: Python's whitespace runs -> one space, ends stripped, the
        final-sigma rule, then `Lowercase` (full case mapping, as `str.lower`). A ByteLevel
        pre-tokenizer turns every UTF-8 byte into one symbol and a merge-free BPE maps symbol b
        to id b + 1; a template frames `[SOT] ... [EOT]`; truncation keeps `context_length - 2`
        bytes (the row `_frame` makes) and padding fills with id 0. SOT, EOT and pad are not
        added tokens, which the Rust side would also match inside a text, where this class
        spells them out byte by byte. Exact wherever this Python's and tokenizers' Unicode
        tables agree; tokenizers' (Unicode 16) also lower-case 55 letters that have no case in
        Python 3.11's Unicode 14 (Garay, Kirat Rai, some Latin), and no longer count U+1171E
        (an Ahom sign Unicode 15 made a spacing mark) as case-ignorable next to a Σ.
        """
        from tokenizers import (
            Regex,
            Tokenizer,
            decoders,
            models,
            normalizers,
            pre_tokenizers,
            processors,
        )

        ctx = self.context_length if context_length is None else int(context_length)
        if ctx < 2:  # the template always adds SOT and EOT
            raise ValueError(f"a tokenizer.json needs context_length >= 2, got {ctx}")
        tok = Tokenizer(models.BPE(vocab=self.hf_vocab(), merges=[]))
        whitespace = "[" + "".join(f"\\x{{{ord(c):04X}}}" for c in PY_WHITESPACE) + "]+"
        tok.normalizer = normalizers.Sequence(
            [
                normalizers.Replace(Regex(whitespace), " "),
                normalizers.Replace(Regex(r"\A\x20|\x20\z"), ""),
                normalizers.Replace(Regex(FINAL_SIGMA_PATTERN), "\u03c2"),
                normalizers.Lowercase(),
            ]
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{SOT_TOKEN} $A {EOT_TOKEN}",
            special_tokens=[(SOT_TOKEN, self.sot_id), (EOT_TOKEN, self.eot_id)],
        )
        # Not being added tokens, the specials would decode as their spelling; drop them.
        specials = (self.pad_token, SOT_TOKEN, EOT_TOKEN)
        tok.decoder = decoders.Sequence(
            [decoders.Replace(t, "") for t in specials] + [decoders.ByteLevel()]
        )
        tok.enable_truncation(max_length=ctx)
        tok.enable_padding(length=ctx, pad_id=self.pad_id, pad_token=self.pad_token)
        return tok

    def save_pretrained(self, directory, context_length: int | None = None) -> list[str]:
        """Write `tokenizer.json` (see `to_hf`; `tokenizers.Tokenizer.from_file` loads it) and
        a `tokenizer_config.json` naming `PreTrainedTokenizerFast` for transformers. Returns
        the names written."""
        tok = self.to_hf(context_length)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": tok.truncation["max_length"],
            # transformers registers the padding token as special and would match a literal
            # "<pad>" in a text; this class spells it out.
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
        }
        files = {
            "tokenizer.json": tok.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2),
        }
        return _write_files(directory, files)

    def __repr__(self) -> str:
        return f"ByteTokenizer(context_length={self.context_length})"


def _is_byte_tokenizer_json(data) -> bool:
    """Whether a parsed tokenizer.json is `ByteTokenizer.save_pretrained`'s."""
    model = data.get("model") if isinstance(data, dict) else None
    return (
        isinstance(model, dict)
        and not model.get("merges")
        and model.get("vocab") == ByteTokenizer.hf_vocab()
    )


def _byte_tokenizer_export(path: str | os.PathLike) -> bool:
    """Whether `path` is, or is a directory holding, a byte tokenizer's tokenizer.json."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not path.endswith(".json") or not os.path.isfile(path):
        return False
    try:
        return _is_byte_tokenizer_json(_load_json(path))
    except ValueError:  # not JSON: ClipTokenizer.from_files says what is wrong with it
        return False


def load_tokenizer(spec: str | os.PathLike, context_length: int = 77):
    """`"bytes"`, or a byte tokenizer's export (a run's `model/`, or its tokenizer.json) ->
    ByteTokenizer; anything else is a path for ClipTokenizer."""
    if (isinstance(spec, str) and spec == "bytes") or _byte_tokenizer_export(spec):
        return ByteTokenizer(context_length=context_length)
    return ClipTokenizer.from_files(spec, context_length=context_length)
