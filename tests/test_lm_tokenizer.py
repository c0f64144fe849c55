"""Tests for fomo_jax.lm_tokenizer.

Nothing can be downloaded, so each LM tokenizer directory is built here: a tiny byte-level BPE is
trained with `tokenizers`, wrapped in transformers' `PreTrainedTokenizerFast` with a chat template
written below, and saved. transformers' `AutoTokenizer` on the same directory is the oracle for
ids, masks, decodings and chat prompts. The byte tokenizer is checked against handwritten ids.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import jinja2
import numpy as np
import pytest
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from fomo_jax.lm_tokenizer import (
    ByteLmTokenizer,
    LmTokenizer,
    load_lm_tokenizer,
    pad_rows,
)
from fomo_jax.tokenizer import ByteTokenizer, load_tokenizer

CORPUS = """
Hello, world! The quick brown fox jumps over the lazy dog. A photo of a dog in the park.
Café au lait; naïve résumé of the crème brûlée. Tokyo 東京 and 日本. Emoji 🐶🐱 👍🏽 ✨.
User questions and assistant answers: what is in the image? A red car next to a blue bus.
Numbers like 2024, 3.14 and 100% appear in text, with tabs\tand newlines\n too.
"""

TEXTS = [
    "Hello, world!",
    "",
    " leading space and trailing  ",
    "Café au lait, naïve résumé",
    "decomposed cafe\u0301 is normalized",  # NFC in the normalizer joins e + U+0301
    "東京 🐶👍🏽 unseen ✨ ꙮ",
    "tabs\tand\nnewlines\r\n",
    "special <|eot_id|> inside<|begin_of_text|>and <|im_end|>",
    "broken <|eot_id",
    "word " * 40,
]

LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# A Llama-3-like template: whitespace control by `-`, strftime_now, raise_exception.
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = 'Cutting Knowledge Year: ' + strftime_now('%Y') %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
# A ChatML (Qwen-like) template written without `-`: its layout depends on trim_blocks and
# lstrip_blocks. It also uses namespace, dict, tojson, continue, and the generation tag.
CHATML_TEMPLATE = """{% set ns = namespace(system=false) %}
{% for message in messages %}
    {% if message.role == 'system' %}{% set ns.system = true %}{% endif %}
{% endfor %}
{% if not ns.system %}
<|im_start|>system
You are a helpful assistant.{% if tools %} Tools: {{ dict(tools=tools) | tojson }}{% endif %}
<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message.role == 'tool' %}{% continue %}{% endif %}
<|im_start|>{{ message.role }}
    {% if message.role == 'assistant' %}
{% generation %}
{% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>
{% endif %}
{{ message.content }}{% if 'tool_calls' in message %} calls={{ message.tool_calls }}{% endif %}
<|im_end|>
{% endgeneration %}
    {% else %}
{{ message.content }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
    {% if enable_thinking is defined and not enable_thinking %}
<think>

</think>

    {% endif %}
{% endif %}
"""
TOOL_TEMPLATE = "{{ bos_token }}tools={{ tools | tojson }};{{ messages[-1]['content'] }}"

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, world!"}],
    [
        {"role": "system", "content": "  Be brief.  "},
        {"role": "user", "content": "Café 東京 🐶?"},
        {"role": "assistant", "content": "Oui <b>&amp;</b> ✨"},
        {"role": "user", "content": "say <|eot_id|> and <|im_end|> literally"},
    ],
    [
        {"role": "user", "content": "why?"},
        {"role": "assistant", "content": "because", "reasoning": "think first", "tool_calls": None},
        {"role": "tool", "content": "ignored"},
        {"role": "user", "content": "ok"},
    ],
    [
        {
            "role": "user",
            "content": [{"type": "image", "image": object()}, {"type": "text", "text": "what?"}],
        }
    ],
]
TOOLS = [{"name": "lookup", "description": "Find <b>&</b> 東京", "parameters": {"x": 1}}]


def train_bpe(specials: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n") * 3, trainer)
    return tok


def save_dir(path, tok, generation_config=None, **hf_kwargs) -> str:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **hf_kwargs).save_pretrained(path)
    if generation_config is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(generation_config, f)
    return str(path)


def auto_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Llama 3 layout: BOS from the post-processor, no pad token, several stop ids."""
    tok = train_bpe(LLAMA3_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
    )
    gen = {"bos_token_id": 0, "eos_token_id": [1, 4]}  # <|end_of_text|>, <|eot_id|>
    return save_dir(
        tmp_path_factory.mktemp("llama3"),
        tok,
        generation_config=gen,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        chat_template=LLAMA3_TEMPLATE,
    )


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """Qwen 2 layout: no BOS, a pad token, left padding, a model-specific image token."""
    return save_dir(
        tmp_path_factory.mktemp("chatml"),
        train_bpe(CHATML_SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        image_token="<image>",
        padding_side="left",
        chat_template=CHATML_TEMPLATE,
    )


@pytest.fixture(params=["llama", "chatml"])
def lm_dir(request):
    return request.getfixturevalue(f"{request.param}_dir")


def copy_dir(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def edit_json(path, **updates):
    with open(path) as f:
        data = json.load(f)
    data.update(updates)
    with open(path, "w") as f:
        json.dump(data, f)


# ------------------------------------------------------------------ ids and masks
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_match_transformers(lm_dir, add_special_tokens):
    ours, ref = LmTokenizer.from_dir(lm_dir), auto_tokenizer(lm_dir)
    for text in TEXTS:
        expected = ref(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode_ids(text, add_special_tokens) == expected, text


def test_special_ids_match_transformers(lm_dir):
    ours, ref = LmTokenizer.from_dir(lm_dir), auto_tokenizer(lm_dir)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )
    assert ours.vocab_size == len(ref) == 400
    assert ours.padding_side == ref.padding_side


def test_llama_specials(llama_dir):
    tok = LmTokenizer.from_dir(llama_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 4, None)
    assert tok.eos_ids == (4, 1)  # the tokenizer's EOS, then generation_config's others
    assert tok.add_bos and tok.encode_ids("hi")[0] == 0
    assert tok.encode_ids("hi", add_special_tokens=False)[0] != 0


def test_chatml_specials(chatml_dir):
    tok, ref = LmTokenizer.from_dir(chatml_dir), auto_tokenizer(chatml_dir)
    assert tok.bos_id is None and not tok.add_bos
    assert tok.eos_ids == (tok.eos_id,) == (2,)
    assert tok.special_ids["image_token"] == ref.image_token_id == 3
    assert tok.padding_side == "left"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_transformers(chatml_dir, side):
    ours, ref = LmTokenizer.from_dir(chatml_dir), auto_tokenizer(chatml_dir)
    batch = ours.encode(TEXTS, padding_side=side)
    expected = ref(TEXTS, padding=True, padding_side=side, return_tensors="np")
    assert batch.ids.dtype == batch.attention_mask.dtype == np.int32
    np.testing.assert_array_equal(batch.ids, expected["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, expected["attention_mask"])


def test_default_padding_side_is_the_configs(chatml_dir):
    ours, ref = LmTokenizer.from_dir(chatml_dir), auto_tokenizer(chatml_dir)
    np.testing.assert_array_equal(
        ours.encode(TEXTS).ids, ref(TEXTS, padding=True, return_tensors="np")["input_ids"]
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_without_pad_token(llama_dir, side):
    """transformers refuses to pad without a pad token; rows must equal its unpadded ids."""
    ours, ref = LmTokenizer.from_dir(llama_dir), auto_tokenizer(llama_dir)
    batch = ours.encode(TEXTS, padding_side=side, length=160)
    assert batch.ids.shape == (len(TEXTS), 160)
    for row, mask, text in zip(batch.ids, batch.attention_mask, TEXTS, strict=True):
        expected = ref(text)["input_ids"]
        real = np.flatnonzero(mask)
        assert row[mask == 1].tolist() == expected
        assert (row[mask == 0] == 0).all()
        start = 160 - len(expected) if side == "left" else 0
        assert real.tolist() == list(range(start, start + len(expected)))


def test_length_shorter_than_a_row_is_an_error(llama_dir):
    with pytest.raises(ValueError, match="more than length=3"):
        LmTokenizer.from_dir(llama_dir).encode(["a long enough text"], length=3)


def test_pad_rows_layout():
    batch = pad_rows([[5, 6], [7]], pad_id=9, padding_side="left")
    assert batch.ids.tolist() == [[5, 6], [9, 7]]
    assert batch.attention_mask.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="padding_side"):
        pad_rows([[1]], 0, "middle")


# ------------------------------------------------------------------ decode
def test_decode_matches_transformers(lm_dir):
    ours, ref = LmTokenizer.from_dir(lm_dir), auto_tokenizer(lm_dir)
    rng = np.random.default_rng(0)
    id_lists = [ours.encode_ids(t) for t in TEXTS]
    id_lists += [rng.integers(0, 400, size=n).tolist() for n in (1, 5, 30)]  # split UTF-8 too
    for ids in id_lists:
        for skip in (False, True):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), ids
    assert ours.decode(np.asarray(id_lists[0])) == ours.decode(id_lists[0])


def test_decode_round_trips(lm_dir):
    tok = LmTokenizer.from_dir(lm_dir)
    for text in TEXTS:
        if "\u0301" not in text:  # NFC changes that one on purpose
            assert tok.decode(tok.encode_ids(text, add_special_tokens=False)) == text


# ------------------------------------------------------------------ chat templates
# The Llama-like template trims string contents and insists on alternating user/assistant turns.
CHATS = {"llama": CONVERSATIONS[:2], "chatml": CONVERSATIONS}


@pytest.mark.parametrize("family", sorted(CHATS))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_prompt_matches_transformers(request, family, generation_prompt):
    path = request.getfixturevalue(f"{family}_dir")
    ours, ref = LmTokenizer.from_dir(path), auto_tokenizer(path)
    for chat in CHATS[family]:
        kwargs = {"add_generation_prompt": generation_prompt}
        text = ours.apply_chat_template(chat, **kwargs)
        assert text == ref.apply_chat_template(chat, tokenize=False, **kwargs)
        expected_ids = ref.apply_chat_template(chat, tokenize=True, **kwargs)["input_ids"]
        assert ours.encode_chat(chat, **kwargs) == expected_ids


def test_chat_prompt_layout(chatml_dir):
    """A fixed expectation, so that a change shared with transformers still shows."""
    text = LmTokenizer.from_dir(chatml_dir).apply_chat_template(
        CONVERSATIONS[2], add_generation_prompt=True, enable_thinking=False
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nwhy?<|im_end|>\n"
        "<|im_start|>assistant\n<think>think first</think>\nbecause<|im_end|>\n"
        "<|im_start|>user\nok<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_tools_and_template_variables_match_transformers(chatml_dir):
    ours, ref = LmTokenizer.from_dir(chatml_dir), auto_tokenizer(chatml_dir)
    # numpy scalars become Python ones: a np.bool_ False must not render as a truthy string.
    kwargs = {"tools": TOOLS, "add_generation_prompt": True, "enable_thinking": np.bool_(False)}
    text = ours.apply_chat_template(CONVERSATIONS[0], **kwargs)
    assert text == ref.apply_chat_template(CONVERSATIONS[0], tokenize=False, **kwargs)
    assert '"Find <b>&</b> 東京"' in text  # tojson neither HTML- nor ASCII-escapes
    assert text.endswith("<think>\n\n</think>\n\n")


def test_raise_exception_in_template(llama_dir):
    chat = [{"role": "assistant", "content": "first"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate") as ours:
        LmTokenizer.from_dir(llama_dir).apply_chat_template(chat)
    with pytest.raises(jinja2.exceptions.TemplateError) as ref:
        auto_tokenizer(llama_dir).apply_chat_template(chat, tokenize=False)
    assert str(ours.value) == str(ref.value)


def test_template_in_tokenizer_config(llama_dir, tmp_path):
    """Older directories keep the template in tokenizer_config.json, not chat_template.jinja."""
    path = copy_dir(llama_dir, tmp_path / "legacy")
    os.remove(os.path.join(path, "chat_template.jinja"))
    edit_json(os.path.join(path, "tokenizer_config.json"), chat_template=LLAMA3_TEMPLATE)
    chat = CONVERSATIONS[1]
    ours = LmTokenizer.from_dir(path).apply_chat_template(chat)
    assert ours == auto_tokenizer(path).apply_chat_template(chat, tokenize=False)
    assert ours == LmTokenizer.from_dir(llama_dir).apply_chat_template(chat)


def test_template_file_wins_over_config(llama_dir, tmp_path):
    path = copy_dir(llama_dir, tmp_path / "both")
    edit_json(os.path.join(path, "tokenizer_config.json"), chat_template="ignored")
    chat = CONVERSATIONS[0]
    ours = LmTokenizer.from_dir(path).apply_chat_template(chat)
    assert ours == auto_tokenizer(path).apply_chat_template(chat, tokenize=False)
    assert ours != "ignored"


def test_named_templates(llama_dir, tmp_path):
    """With tools, the `tool_use` template of additional_chat_templates/ is used."""
    path = copy_dir(llama_dir, tmp_path / "named")
    os.mkdir(os.path.join(path, "additional_chat_templates"))
    with open(os.path.join(path, "additional_chat_templates", "tool_use.jinja"), "w") as f:
        f.write(TOOL_TEMPLATE)
    ours, ref = LmTokenizer.from_dir(path), auto_tokenizer(path)
    chat = CONVERSATIONS[0]
    for tools in (None, TOOLS):
        text = ours.apply_chat_template(chat, tools=tools)
        assert text == ref.apply_chat_template(chat, tools=tools, tokenize=False)
    assert ours.apply_chat_template(chat, tools=TOOLS).startswith("<|begin_of_text|>tools=[")


def test_no_chat_template_names_the_directory(tmp_path):
    path = save_dir(tmp_path / "plain", train_bpe(["<|endoftext|>"]), eos_token="<|endoftext|>")
    tok = LmTokenizer.from_dir(path)
    with pytest.raises(ValueError, match=f"{path}: this tokenizer has no chat template"):
        tok.apply_chat_template(CONVERSATIONS[0])


def test_empty_conversation_is_an_error(llama_dir):
    with pytest.raises(ValueError, match="empty conversation"):
        LmTokenizer.from_dir(llama_dir).apply_chat_template([])


@pytest.mark.parametrize(
    "template",
    ["{{ messages.__class__.__mro__ }}", "{% set ns = namespace(_x=1) %}"],
)
def test_sandbox_blocks_underscore_attributes(tmp_path, template):
    path = save_dir(
        tmp_path / "evil",
        train_bpe(["<|endoftext|>"]),
        eos_token="<|endoftext|>",
        chat_template=template,
    )
    with pytest.raises(jinja2.exceptions.SecurityError):
        LmTokenizer.from_dir(path).apply_chat_template(CONVERSATIONS[0])
    with pytest.raises(jinja2.exceptions.SecurityError):
        auto_tokenizer(path).apply_chat_template(CONVERSATIONS[0], tokenize=False)


# ------------------------------------------------------------------ special-token sources
def test_special_tokens_map(chatml_dir, tmp_path):
    """Legacy directories name specials in special_tokens_map.json; transformers reads it when
    the config has no added_tokens_decoder, and lets it win over the config."""
    path = copy_dir(chatml_dir, tmp_path / "legacy_map")
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    del config["pad_token"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    special_map = {"pad_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_start|>"}
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(special_map, f)
    ours, ref = LmTokenizer.from_dir(path), auto_tokenizer(path)
    assert (ours.pad_id, ours.eos_id) == (ref.pad_token_id, ref.eos_token_id) == (0, 1)


def test_padding_and_truncation_in_tokenizer_json(chatml_dir, tmp_path):
    """A tokenizer.json's padding gives the pad token and side; its truncation is not applied."""
    path = copy_dir(chatml_dir, tmp_path / "baked")
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    del config["pad_token"], config["padding_side"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tok.enable_padding(direction="left", pad_id=1, pad_token="<|im_start|>")
    tok.enable_truncation(max_length=4)
    tok.save(os.path.join(path, "tokenizer.json"))
    ours, ref = LmTokenizer.from_dir(path), auto_tokenizer(path)
    assert (ours.pad_id, ours.padding_side) == (ref.pad_token_id, ref.padding_side) == (1, "left")
    expected = ref(TEXTS, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours.encode(TEXTS).ids, expected["input_ids"])
    assert ours.encode(TEXTS).ids.shape[1] > 4


def test_special_token_only_in_model_vocab_is_registered(llama_dir, tmp_path):
    """transformers registers the configured specials, so their text is one token and
    skip_special_tokens drops it, even when tokenizer.json lists it only in the vocabulary."""
    path = copy_dir(llama_dir, tmp_path / "vocab_only")
    tokenizer_file = os.path.join(path, "tokenizer.json")
    with open(tokenizer_file) as f:
        data = json.load(f)
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|eot_id|>"]
    with open(tokenizer_file, "w") as f:
        json.dump(data, f)
    ours, ref = LmTokenizer.from_dir(path), auto_tokenizer(path)
    text = "a<|eot_id|>b"
    assert ours.encode_ids(text) == ref(text)["input_ids"]
    assert 4 in ours.encode_ids(text)
    assert ours.decode(ours.encode_ids(text), skip_special_tokens=True) == "ab"


def test_unknown_special_token_is_an_error(llama_dir, tmp_path):
    path = copy_dir(llama_dir, tmp_path / "unknown")
    edit_json(os.path.join(path, "tokenizer_config.json"), pad_token="<|no_such_token|>")
    with pytest.raises(ValueError, match="'<\\|no_such_token\\|>' is not in tokenizer.json"):
        LmTokenizer.from_dir(path)


def test_generation_config_id_outside_vocabulary(llama_dir, tmp_path):
    path = copy_dir(llama_dir, tmp_path / "bad_gen")
    edit_json(os.path.join(path, "generation_config.json"), eos_token_id=[4, 400])
    with pytest.raises(ValueError, match="eos id 400 outside the vocabulary"):
        LmTokenizer.from_dir(path)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no tokenizer.json"):
        LmTokenizer.from_dir(tmp_path)


# ------------------------------------------------------------------ entry points
def test_load_lm_tokenizer(llama_dir):
    assert isinstance(load_lm_tokenizer("bytes"), ByteLmTokenizer)
    assert isinstance(load_lm_tokenizer(llama_dir), LmTokenizer)


def test_clip_loader_still_refuses_an_lm_directory(llama_dir):
    """load_tokenizer keeps CLIP's meaning; an LM directory goes through load_lm_tokenizer."""
    with pytest.raises(ValueError, match="<\\|startoftext\\|>"):
        load_tokenizer(llama_dir)


# ------------------------------------------------------------------ bytes
def test_clip_byte_tokenizer_ids_unchanged():
    """CLIP pools at the largest id: its byte ids must not move when the VLM adds specials."""
    tok = ByteTokenizer(context_length=8)
    assert tok.vocab_size == 259
    assert tok("Hi!").tolist() == [[257, 105, 106, 34, 258, 0, 0, 0]]  # lower-cased
    assert tok(["abcdefghij"]).tolist() == [[257, 98, 99, 100, 101, 102, 103, 258]]
    assert tok("é").tolist() == [[257, 196, 170, 258, 0, 0, 0, 0]]
    assert tok("<image>", context_length=10).tolist() == [
        [257, 61, 106, 110, 98, 104, 102, 63, 258, 0]  # markup is plain bytes for CLIP
    ]


def test_byte_lm_ids():
    tok = ByteLmTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 257, 258)
    assert (tok.image_token_id, tok.image_wrapper_token_id, tok.end_of_utterance_token_id) == (
        259,
        260,
        261,
    )
    assert tok.vocab_size == 262
    assert tok.encode_ids("a<image>B") == [257, 98, 259, 67]  # no lower-casing
    assert tok.encode_ids("<fake_token_around_image><image><fake_token_around_image>", False) == [
        260,
        259,
        260,
    ]
    assert tok.encode_ids("Hi<end_of_utterance>", False) == [73, 106, 261]
    assert tok.encode_ids("<<image>>", False) == [61, 259, 63]
    assert tok.encode_ids("<imag e>", False) == [61, 106, 110, 98, 104, 33, 102, 63]
    assert tok.encode_ids("é<|endoftext|>", False) == [196, 170, 258]


def test_byte_lm_shares_clip_byte_ids():
    text = "a photo of a dog, 3 cats & café"
    assert ByteLmTokenizer().encode_ids(text, False) == ByteTokenizer().encode(text)


def test_byte_lm_decode():
    tok = ByteLmTokenizer()
    ids = [257, 98, 259, 99, 261, 258, 0, 0]
    assert tok.decode(ids) == "<|startoftext|>a<image>b<end_of_utterance><|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.decode(np.asarray([196, 170])) == "é"
    assert tok.decode([196]) == "\ufffd"  # half a UTF-8 character
    with pytest.raises(ValueError, match="id 262 outside"):
        tok.decode([262])


def test_byte_lm_round_trip():
    tok = ByteLmTokenizer()
    rng = random.Random(0)
    pieces = ["<image>", "<fake_token_around_image>", "<end_of_utterance>", "<|endoftext|>"]
    pieces += ["<", ">", "image", "a", " ", "\n", "é", "東京", "🐶", "<|", "Z"]
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert tok.decode(tok.encode_ids(text, add_special_tokens=False)) == text
        assert tok.decode(tok.encode_ids(text)) == "<|startoftext|>" + text


def test_byte_lm_padding():
    tok = ByteLmTokenizer()
    right = tok.encode(["ab", "<image>"])
    assert right.ids.tolist() == [[257, 98, 99], [257, 259, 0]]
    assert right.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    left = tok.encode(["ab", "<image>"], padding_side="left", add_special_tokens=False, length=3)
    assert left.ids.tolist() == [[0, 98, 99], [0, 0, 259]]
    assert left.attention_mask.tolist() == [[0, 1, 1], [0, 0, 1]]
