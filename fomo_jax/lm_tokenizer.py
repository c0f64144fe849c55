"""Tokenizers for the VLM's decoder LM.

Two tokenizers share one small interface (`encode_ids`, `encode`, `decode`, `bos_id`, `eos_id`,
`eos_ids`, `pad_id`, `vocab_size`):

* `LmTokenizer`: a real LM's `tokenizer.json`, run by the HF `tokenizers` library (transformers is
  not needed at run time), with the special tokens and chat template of its directory, giving the
  ids, masks, decodings and chat prompts that `transformers.AutoTokenizer` gives for it.
* `ByteLmTokenizer`: the synthetic world's bytes. It keeps `ByteTokenizer`'s ids (0 pad, byte b ->
  b + 1, SOT 257, EOT 258) and appends the VLM's specials after them, so nothing is renumbered.

`load_lm_tokenizer("bytes" | directory)` builds either. This is deliberately not the CLIP
`load_tokenizer`: CLIP tokenizers return `[sot] + text + [eot]` frames for argmax pooling, LM
tokenizers return unframed ids with an attention mask, and a CLIP HF directory also holds a
`tokenizer.json`, so guessing the family from the files would be fragile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from fomo_jax.chat_template import render_chat_template
from fomo_jax.tokenizer import EOT_TOKEN, SOT_TOKEN, ByteTokenizer

# transformers' named special tokens: the ones a chat template sees as variables.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Padded token ids `[n, T]` int32 and the attention mask (1 on real tokens, 0 on padding)."""

    ids: np.ndarray
    attention_mask: np.ndarray


def pad_rows(
    rows: Sequence[Sequence[int]], pad_id: int, padding_side: str, length: int | None = None
) -> TokenBatch:
    """Pad rows to the longest row, or to `length` (a fixed shape for jit), on either side."""
    _check_side(padding_side)
    longest = max((len(r) for r in rows), default=0)
    width = longest if length is None else int(length)
    if longest > width:
        raise ValueError(f"a row has {longest} tokens, more than length={width} (no truncation)")
    ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.int32)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        ids[i, cols] = row
        mask[i, cols] = 1
    return TokenBatch(ids, mask)


def _check_side(padding_side: str) -> str:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    return padding_side


def _as_texts(texts: str | Iterable[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"expected str texts, got {type(t).__name__}")
    return texts


def _as_ids(ids: Iterable[int]) -> list[int]:
    return [int(i) for i in np.asarray(ids).reshape(-1)]


class _PaddedEncoder:
    """`encode` for any tokenizer with `encode_batch_ids`, `pad_id` and `padding_side`."""

    def encode(
        self,
        texts: str | Iterable[str],
        *,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
        length: int | None = None,
    ) -> TokenBatch:
        """Tokenize a batch into padded int32 ids and an attention mask.

        Without a pad token (Llama 3 has none) padding is filled with 0: the mask, not the fill
        value, marks padding, as with transformers' `pad_token = eos_token` idiom.
        """
        rows = self.encode_batch_ids(_as_texts(texts), add_special_tokens=add_special_tokens)
        pad = 0 if self.pad_id is None else self.pad_id
        return pad_rows(rows, pad, padding_side or self.padding_side, length)

    def encode_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch_ids([text], add_special_tokens=add_special_tokens)[0]


# ------------------------------------------------------------------ HF tokenizer directories
class LmTokenizer(_PaddedEncoder):
    """A HF `tokenizer.json` with its directory's special tokens and chat templates.

    Build it with `from_dir`. Whether a BOS is prepended follows `tokenizer.json`'s
    post-processor, as in transformers 5, which ignores `add_bos_token` in
    `tokenizer_config.json` when a `tokenizer.json` exists; `add_bos` reports the outcome.
    """

    def __init__(
        self,
        tokenizer,
        special_tokens: Mapping[str, str],
        *,
        extra_eos_ids: Sequence[int] = (),
        fallback_ids: Mapping[str, int] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        padding_side: str = "right",
        source: str = "<memory>",
    ):
        self._tok = tokenizer
        self.source = source
        self.special_tokens = dict(special_tokens)
        self.special_ids = {name: self._id_of(name, tok) for name, tok in special_tokens.items()}
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Count by the largest id, not the entry count, so that every id has an embedding row.
        self.vocab_size = max(vocab.values()) + 1
        fallback = dict(fallback_ids or {})
        self.bos_id = self.special_ids.get("bos_token", fallback.get("bos_token"))
        self.eos_id = self.special_ids.get("eos_token", next(iter(extra_eos_ids), None))
        self.pad_id = self.special_ids.get("pad_token", fallback.get("pad_token"))
        # Every id that ends generation: the tokenizer's EOS first, then generation_config's.
        stop = [] if self.eos_id is None else [self.eos_id]
        self.eos_ids = tuple(dict.fromkeys([*stop, *(int(i) for i in extra_eos_ids)]))
        self._check_ids()
        self.padding_side = _check_side(padding_side)
        self.chat_templates = dict(chat_templates or {})
        probe = tokenizer.encode("", add_special_tokens=True).ids
        self.add_bos = self.bos_id is not None and probe[:1] == [self.bos_id]

    def _id_of(self, name: str, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.source}: {name} {token!r} is not in the vocabulary")
        return int(i)

    def _check_ids(self) -> None:
        named = [("bos", self.bos_id), ("pad", self.pad_id), *(("eos", i) for i in self.eos_ids)]
        for name, i in named:
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"{self.source}: {name} id {i} outside the vocabulary [0, {self.vocab_size})"
                )

    def encode_batch_ids(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        if not texts:
            return []
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (drop padding first, e.g. with the attention mask). transformers 5 also
        skips `clean_up_tokenization_spaces` for BPE models, so nothing is post-processed here."""
        return self._tok.decode(_as_ids(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping] | None = None,
        documents: Sequence[Mapping] | None = None,
        **template_vars,
    ) -> str:
        """The prompt string, as transformers' `apply_chat_template(..., tokenize=False)`.

        The template also sees the named special tokens (`bos_token`, ...) and `template_vars`
        (e.g. `enable_thinking`), which override them.
        """
        template = self._chat_template(tools)
        variables = {
            **{k: v for k, v in self.special_tokens.items() if k in NAMED_SPECIAL_TOKENS},
            **template_vars,
        }
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            **variables,
        )

    def encode_chat(self, messages: Sequence[Mapping], **kwargs) -> list[int]:
        """Ids of the chat prompt, as `apply_chat_template(..., tokenize=True)`: the template
        writes every special token itself, so none is added."""
        return self.encode_ids(self.apply_chat_template(messages, **kwargs), False)

    def _chat_template(self, tools) -> str:
        templates = self.chat_templates
        if not templates:
            raise ValueError(
                f"{self.source}: this tokenizer has no chat template (no 'chat_template' in "
                "tokenizer_config.json, no chat_template.jinja)"
            )
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" not in templates:
            raise ValueError(
                f"{self.source}: several chat templates {sorted(templates)} and none is 'default'"
            )
        return templates["default"]

    def __repr__(self) -> str:
        return f"LmTokenizer({self.source!r}, vocab_size={self.vocab_size})"

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> LmTokenizer:
        """Load `tokenizer.json` plus `tokenizer_config.json`, `special_tokens_map.json`,
        `generation_config.json`, `chat_template.jinja` and `additional_chat_templates/`."""
        from tokenizers import AddedToken, Tokenizer

        path = os.fspath(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"{path}: no tokenizer.json (an HF LM tokenizer directory)")
        try:
            tok = Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust error says what is malformed
            raise ValueError(f"{tokenizer_file}: not a loadable tokenizer.json: {e}") from e
        # Padding baked into tokenizer.json supplies defaults (as in transformers), but `encode`
        # pads, and nothing truncates silently.
        json_padding = tok.padding or {}
        tok.no_padding()
        tok.no_truncation()
        config = _read_json(path, "tokenizer_config.json")
        tokens, extra = _special_tokens(config, _read_json(path, "special_tokens_map.json"))
        tokens.setdefault("pad_token", json_padding.get("pad_token"))  # as transformers does
        tokens = {k: v for k, v in tokens.items() if v is not None}
        # transformers registers every special token, so its text is matched whole and
        # skip_special_tokens drops it even when tokenizer.json lists it as an ordinary token.
        known = {str(t) for t in tok.get_added_tokens_decoder().values()}
        missing = [t for t in (*tokens.values(), *extra) if t not in known]
        for t in missing:
            if tok.token_to_id(t) is None:
                raise ValueError(f"{path}: special token {t!r} is not in tokenizer.json")
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        generation = _read_json(path, "generation_config.json")
        return cls(
            tok,
            tokens,
            extra_eos_ids=_id_list(generation.get("eos_token_id")),
            fallback_ids={
                k: int(generation[f"{k}_id"])
                for k in ("bos_token", "pad_token")
                if generation.get(f"{k}_id") is not None
            },
            chat_templates=_chat_templates(path, config),
            padding_side=config.get("padding_side") or json_padding.get("direction", "right"),
            source=path,
        )


def _read_json(directory: str, name: str) -> dict:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_text(value) -> str | None:
    """A special token as configs spell it: a string or a serialized `AddedToken`."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(config: dict, special_map: dict) -> tuple[dict[str, str], list[str]]:
    """Named tokens (`bos_token`, model-specific ones such as `image_token`) and unnamed extras.

    transformers reads `special_tokens_map.json` only when the config has no
    `added_tokens_decoder`, and then lets the map win.
    """
    sources = [config] + ([special_map] if "added_tokens_decoder" not in config else [])
    named: dict[str, str] = {}
    extra: list[str] = []
    for source in sources:
        for key, value in source.items():
            if key.endswith("_token") and _token_text(value) is not None:
                named[key] = _token_text(value)
            elif key in ("additional_special_tokens", "extra_special_tokens"):
                if isinstance(value, Mapping):  # transformers 5's named form
                    named.update({k: _token_text(v) for k, v in value.items() if _token_text(v)})
                else:
                    extra += [_token_text(v) for v in value or [] if _token_text(v)]
    return named, list(dict.fromkeys(extra))


def _id_list(value) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _chat_templates(path: str, config: dict) -> dict[str, str]:
    """Template files win over `tokenizer_config.json`'s `chat_template`, as in transformers."""
    files = {}
    default = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(default):
        files["default"] = default
    extra_dir = os.path.join(path, "additional_chat_templates")
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                files[name.removesuffix(".jinja")] = os.path.join(extra_dir, name)
    if files:
        templates = {}
        for name, file in files.items():
            with open(file, encoding="utf-8") as f:
                templates[name] = f.read()
        return templates
    template = config.get("chat_template")
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list):  # the older named form: [{"name": ..., "template": ...}]
        return {t["name"]: t["template"] for t in template}
    return {}


# ------------------------------------------------------------------ synthetic bytes
class ByteLmTokenizer(_PaddedEncoder):
    """`ByteTokenizer`'s ids plus the VLM's specials, for synthetic worlds.

    Ids: 0 pad, byte b -> b + 1, BOS 257 (CLIP's SOT), EOS 258 (CLIP's EOT), then
    259 `<image>` (one visual-token slot), 260 `<fake_token_around_image>` (Idefics2's wrapper,
    written on both sides of an image, so it serves as image start and end), and 261
    `<end_of_utterance>` (ends a chat turn). The spec's other specials need no id here: a
    separator or `User:` prefix is ordinary text. CLIP keeps `ByteTokenizer`, which pools at the
    largest id (its EOT) and so must not see these.

    Unlike `ByteTokenizer` the text is not cleaned (no lower-casing or whitespace collapse), so
    `decode(encode_ids(t, add_special_tokens=False)) == t` for every text, and the markup
    above (or the SOT/EOT names) in a text becomes the special id.
    """

    pad_id = ByteTokenizer.pad_id
    bos_id = ByteTokenizer.sot_id
    eos_id = ByteTokenizer.eot_id
    image_token_id = ByteTokenizer.vocab_size
    image_wrapper_token_id = image_token_id + 1
    end_of_utterance_token_id = image_token_id + 2
    vocab_size = image_token_id + 3
    eos_ids = (eos_id,)
    add_bos = True
    padding_side = "right"

    special_tokens = {
        "bos_token": SOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "image_token": "<image>",
        "image_wrapper_token": "<fake_token_around_image>",
        "end_of_utterance_token": "<end_of_utterance>",
    }
    special_ids = {
        "bos_token": bos_id,
        "eos_token": eos_id,
        "image_token": image_token_id,
        "image_wrapper_token": image_wrapper_token_id,
        "end_of_utterance_token": end_of_utterance_token_id,
    }

    def __init__(self):
        self._markup_to_id = {self.special_tokens[k]: i for k, i in self.special_ids.items()}
        self._id_to_markup = {i: m for m, i in self._markup_to_id.items()}
        # Longest first, so that a markup string that starts another could never shadow it.
        names = sorted(self._markup_to_id, key=len, reverse=True)
        self._markup_re = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    def encode_batch_ids(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        return [self._encode_one(t, add_special_tokens) for t in texts]

    def _encode_one(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [self.bos_id] if add_special_tokens else []
        # re.split with a group alternates text (even indices) and markup (odd indices).
        for n, piece in enumerate(self._markup_re.split(text)):
            if n % 2:
                ids.append(self._markup_to_id[piece])
            else:
                ids.extend(b + 1 for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Bytes back to text and specials back to their markup; padding (id 0) is dropped."""
        out, run = [], bytearray()
        for i in _as_ids(ids):
            if 1 <= i <= 256:
                run.append(i - 1)
                continue
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} outside the vocabulary [0, {self.vocab_size})")
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if i != self.pad_id and not skip_special_tokens:
                out.append(self._id_to_markup[i])
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def __repr__(self) -> str:
        return f"ByteLmTokenizer(vocab_size={self.vocab_size})"


def load_lm_tokenizer(spec: str | os.PathLike) -> LmTokenizer | ByteLmTokenizer:
    """`"bytes"` -> `ByteLmTokenizer`; anything else is an HF tokenizer directory."""
    if isinstance(spec, str) and spec == "bytes":
        return ByteLmTokenizer()
    return LmTokenizer.from_dir(spec)
