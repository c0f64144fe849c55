"""Exports the ecosystem opens, checked with the ecosystem's own readers.

* An HF CLIP export with a CLIP BPE tokenizer: `transformers.CLIPProcessor` and `CLIPModel`
  load it, and give our tokenizer's ids, our evaluation transform's pixels and our embeddings.
* A byte-tokenizer export: `tokenizers` (and transformers) tokenize exactly like `ByteTokenizer`.
* An OpenCLIP state dict: the keys and tensors an independent renaming (the test's own, from
  the HF model) gives, read back by `load_pretrained` bit for bit, architecture included.

No vocabulary can be downloaded: the CLIP BPE is learnt from a small corpus as in
tests/test_tokenizer.py.
"""

import dataclasses
import gzip
import json
import random
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

from fomo_jax import models
from fomo_jax import params as params_lib
from fomo_jax.data.transforms import normalize, test_transform
from fomo_jax.tokenizer import (
    EOT_TOKEN,
    PY_WHITESPACE,
    ByteTokenizer,
    ClipTokenizer,
    load_tokenizer,
)
from tests.models.hf_util import make_hf_clip
from tests.models.test_openclip_import import openclip_state_dict
from tests.test_tokenizer import COMPARE_TEXTS, CORPUS, learn_bpe

CONTEXT = 24
IMAGE = 32


def _perturbed(model, seed):
    """The model with every parameter moved by O(0.1) noise: LayerNorms and biases are no
    longer (1, 0), so a scale/bias mix-up or a dropped tensor changes the outputs."""
    graphdef, params = params_lib.split(model)
    rng = np.random.default_rng(seed)
    flat = {
        k: np.asarray(v) + 0.1 * rng.standard_normal(np.shape(v)).astype(np.float32)
        for k, v in params_lib.flatten(params).items()
    }
    return params_lib.merge(graphdef, params_lib.unflatten(flat))


def _tiny(seed=0, **overrides):
    return _perturbed(models.create_model(models.get_config("tiny", **overrides), seed), seed)


def _param_bits(model):
    return {k: np.asarray(v) for k, v in params_lib.flatten(params_lib.split(model)[1]).items()}


# ---------------------------------------------------------------- HF CLIP with a BPE tokenizer
@pytest.fixture(scope="module")
def clip_export(tmp_path_factory):
    """A tiny CLIP over a learnt CLIP BPE (OpenCLIP .txt.gz), exported with its tokenizer."""
    root = tmp_path_factory.mktemp("clip_export")
    gz = root / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in learn_bpe(CORPUS, 150)))
    tok = ClipTokenizer.from_files(gz, context_length=CONTEXT)
    cfg = models.get_config("tiny")
    text = dataclasses.replace(cfg.text, vocab_size=tok.vocab_size, context_length=CONTEXT)
    model = _perturbed(models.create_model(cfg.replace(text=text), seed=3), seed=3)
    directory = root / "model"
    models.export_hf(model, directory, tokenizer=tok)
    return model, tok, directory


# Captions that transformers' CLIP normalizer (NFC, \s+ -> " ", lower) cleans as OpenCLIP does
# (tests/test_tokenizer.py CLEANING_TEXTS are where they differ), long ones truncated.
CAPTIONS = [t for t in COMPARE_TEXTS if t] + ["A " + "very " * 40 + "long caption"]


def test_clip_export_writes_the_processor_files(clip_export, tmp_path):
    model, tok, directory = clip_export
    names = {p.name for p in directory.iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    # Our own reader takes the files back (the HF-directory route) with the same ids, and
    # saving what it read writes the same files.
    again = ClipTokenizer.from_files(directory, context_length=CONTEXT)
    np.testing.assert_array_equal(again(CAPTIONS), tok(CAPTIONS))
    for name in again.save_pretrained(tmp_path):
        assert (tmp_path / name).read_bytes() == (directory / name).read_bytes(), name
    text_config = json.loads((directory / "config.json").read_text())["text_config"]
    assert (text_config["bos_token_id"], text_config["eos_token_id"]) == (tok.sot_id, tok.eot_id)


def test_processor_ids_equal_ours_up_to_padding(clip_export):
    """Convention: HF pads with <|endoftext|> (as openai/clip-vit-*), we pad with 0; both keep
    SOT + the first context - 2 tokens + EOT when truncating."""
    from transformers import CLIPProcessor

    _, tok, directory = clip_export
    processor = CLIPProcessor.from_pretrained(directory)
    assert processor.tokenizer.model_max_length == CONTEXT
    got = processor(text=CAPTIONS, padding="max_length", truncation=True, return_tensors="np")
    got = got["input_ids"]
    ours = tok(CAPTIONS)
    assert got.shape == ours.shape == (len(CAPTIONS), CONTEXT)
    for row, (hf_row, our_row) in enumerate(zip(got, ours, strict=True)):
        end = list(our_row).index(tok.eot_id) + 1
        np.testing.assert_array_equal(hf_row[:end], our_row[:end], err_msg=CAPTIONS[row])
        assert (hf_row[end:] == tok.eot_id).all() and (our_row[end:] == 0).all()
    assert (ours[-1] != 0).all()  # the long caption was truncated, not padded


@pytest.mark.parametrize("height, width", [(45, 60), (40, 40), (300, 200), (33, 100), (31, 32)])
def test_processor_pixels_equal_our_test_transform(clip_export, height, width):
    """Both resample with PIL bicubic: measured equal to float32 rounding (max |diff| 0.0)."""
    from transformers import CLIPProcessor

    _, _, directory = clip_export
    processor = CLIPProcessor.from_pretrained(directory)
    rng = np.random.default_rng(height * 1000 + width)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    got = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    want = normalize(test_transform(image, IMAGE)[None])[0]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("height, width, axis", [(32, 35, 1), (64, 37, 0), (20, 27, 1)])
def test_processor_crop_rounds_down_where_torchvision_rounds(clip_export, height, width, axis):
    """When the resized long side exceeds the crop by 3 mod 4, torchvision's CenterCrop offset
    round((side - crop) / 2) is one more than HF's floor: the same pixels, one pixel apart."""
    from transformers import CLIPProcessor

    _, _, directory = clip_export
    processor = CLIPProcessor.from_pretrained(directory)
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    got = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    want = normalize(test_transform(image, IMAGE)[None])[0]
    assert np.abs(got - want).max() > 0.1
    shifted = got[:, 1:] if axis == 1 else got[1:]
    kept = want[:, :-1] if axis == 1 else want[:-1]
    np.testing.assert_allclose(shifted, kept, atol=1e-6, rtol=0)


def test_clip_model_embeddings_equal_ours(clip_export):
    """CLIPModel on the processor's outputs == our model on our tokenizer and transform."""
    from transformers import CLIPModel, CLIPProcessor

    model, tok, directory = clip_export
    processor = CLIPProcessor.from_pretrained(directory)
    hf_model = CLIPModel.from_pretrained(directory).eval()
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(45, 60), (40, 40), (300, 200)]
    ]
    inputs = processor(
        text=CAPTIONS, images=images, padding="max_length", truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        hf_image = hf_model.get_image_features(pixel_values=inputs["pixel_values"])
        hf_text = hf_model.get_text_features(input_ids=inputs["input_ids"])
    hf_image = getattr(hf_image, "pooler_output", hf_image).numpy()
    hf_text = getattr(hf_text, "pooler_output", hf_text).numpy()
    pixels = normalize(np.stack([test_transform(image, IMAGE) for image in images]))
    ours_image = np.asarray(model.encode_image(pixels))
    ours_text = np.asarray(model.encode_text(tok(CAPTIONS)))
    assert np.abs(ours_image).mean() > 0.1 and np.abs(ours_text).mean() > 0.1  # not vacuous
    np.testing.assert_allclose(hf_image, ours_image, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hf_text, ours_text, rtol=1e-4, atol=1e-5)


def test_export_keeps_one_tokenizer_kind(clip_export, tmp_path):
    """Re-exporting with the other tokenizer removes the first one's files; without a
    tokenizer, tokenizer files already there are kept."""
    model, tok, _ = clip_export
    models.export_hf(model, tmp_path, tokenizer=tok)
    models.export_hf(model, tmp_path, tokenizer=ByteTokenizer(CONTEXT))
    assert not (tmp_path / "vocab.json").exists() and not (tmp_path / "merges.txt").exists()
    assert isinstance(load_tokenizer(tmp_path, context_length=CONTEXT), ByteTokenizer)
    models.export_hf(model, tmp_path, tokenizer=tok)
    assert not (tmp_path / "tokenizer.json").exists()
    models.export_hf(model, tmp_path)
    np.testing.assert_array_equal(
        ClipTokenizer.from_files(tmp_path, context_length=CONTEXT)(CAPTIONS), tok(CAPTIONS)
    )


def test_export_refuses_what_it_cannot_write(clip_export, tmp_path):
    model, tok, _ = clip_export
    small = models.create_model("tiny")  # 259 ids: the BPE's do not fit its embedding
    with pytest.raises(ValueError, match=f"{tok.vocab_size} ids.*259 rows"):
        models.export_hf(small, tmp_path, tokenizer=tok)
    with pytest.raises(TypeError, match="save_pretrained"):
        models.export_hf(small, tmp_path, tokenizer="bytes")
    adapted = models.create_model(
        models.get_config("tiny", adapter=models.AdapterConfig("lora", 2, ".*q_proj"))
    )
    for export in (models.export_hf, models.export_openclip):
        with pytest.raises(ValueError, match="lora adapters.*merge_adapters"):
            export(adapted, tmp_path / "m.safetensors")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_sigmoid_loss_clip_keeps_its_logit_bias(tmp_path):
    """A CLIP trained with `config.loss="siglip"` carries `logit_bias`: both exports write it
    (under OpenCLIP's own key, `logit_bias`, in both layouts) and read it back bit for bit;
    transformers' CLIPModel still opens the HF export (the bias is a weight it does not
    use) and gives our logit scale."""
    import transformers

    model = models.create_model(models.get_config("tiny", logit_bias=-7.25), seed=3)
    want = params_lib.flatten(params_lib.split(model)[1])
    assert float(want["logit_bias"]) == -7.25
    models.export_hf(model, tmp_path / "hf")
    models.export_openclip(model, tmp_path / "oc.safetensors")
    assert float(load_file(str(tmp_path / "hf" / "model.safetensors"))["logit_bias"]) == -7.25
    assert float(load_file(str(tmp_path / "oc.safetensors"))["logit_bias"]) == -7.25
    for path in (tmp_path / "hf", tmp_path / "oc.safetensors"):
        loaded = models.load_pretrained(path)
        assert loaded.config.logit_bias == -7.25, path
        got = params_lib.flatten(params_lib.split(loaded)[1])
        assert set(got) == set(want), path
        for key, value in want.items():
            np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=key)
    hf = transformers.CLIPModel.from_pretrained(tmp_path / "hf")
    np.testing.assert_allclose(
        float(hf.logit_scale.detach()), float(want["logit_scale"]), rtol=1e-7
    )


# -------------------------------------------------------------------------- byte tokenizer
@pytest.fixture(scope="module")
def byte_export(tmp_path_factory):
    directory = tmp_path_factory.mktemp("byte_export")
    models.export_hf(models.create_model("tiny"), directory, tokenizer=ByteTokenizer(16))
    return directory


def _hf_ids(tokenizer, texts) -> np.ndarray:
    return np.array([e.ids for e in tokenizer.encode_batch(texts)], np.int32)


def _random_texts(rng: random.Random, n: int) -> list[str]:
    """Strings mixing ASCII, letters of many scripts (cased ones, final-sigma contexts, İ),
    emoji with modifiers and joiners, every Python whitespace, combining marks, apostrophes."""
    pools = [
        [chr(c) for c in range(32, 127)],
        list("ΑΣΟΔΦΙσςΐΰ ΣΣ'̓ͅ"),  # Greek with case-ignorable marks and apostrophes
        list("İIıiŞşÇçĞğÖöÜüẞßǅǈǋ ﬁﬀ"),  # special lower-case mappings and titlecase letters
        list("АБВГДЕЁЖЗабвгдеёжз ÀÉÎÕÜàéîõü ĀĒĪŌŪ Ꭰ Ａｂｃ"),
        list("日本語東京タワー한국어中文 العربية עברית हिन्दी ไทย"),
        ["🐶", "🐱", "👍🏽", "👩‍💻", "✨", "🇩🇪", "\u200d", "\ufe0f"],
        list(PY_WHITESPACE) + ["\u200b", "\u180e", "\ufeff"],  # and three that are not
        [chr(rng.randrange(0x20, 0x3000)) for _ in range(200)],
        [chr(rng.randrange(0x10000, 0x1FFFF)) for _ in range(50)],
    ]
    texts = []
    for _ in range(n):
        length = rng.choice([0, 1, 3, 10, 30, 100, 400])
        texts.append("".join(rng.choice(rng.choice(pools)) for _ in range(length)))
    return texts


def test_hf_pools_at_the_tokenizers_eot_in_a_larger_vocabulary(tmp_path):
    """A 300-row embedding under the 259-id byte tokenizer: HF pools at the first
    `eos_token_id`, which must be the tokenizer's EOT (258), not the embedding's last row."""
    from tokenizers import Tokenizer
    from transformers import CLIPModel

    cfg = models.get_config("tiny")
    model = _perturbed(
        models.create_model(cfg.replace(text=dataclasses.replace(cfg.text, vocab_size=300))), 1
    )
    models.export_hf(model, tmp_path, tokenizer=ByteTokenizer(cfg.text.context_length))
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = _hf_ids(hf, ["a dog", "Two CATS on a sofa", "x" * 40])
    with torch.no_grad():
        got = (
            CLIPModel.from_pretrained(tmp_path)
            .eval()
            .get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
        )
    got = getattr(got, "pooler_output", got).numpy()
    np.testing.assert_allclose(got, np.asarray(model.encode_text(ids)), rtol=1e-4, atol=1e-5)


def test_python_whitespace_table_is_str_isspace():
    every = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
    assert PY_WHITESPACE == every


@pytest.mark.parametrize("context", [2, 5, 16, 77])
def test_byte_tokenizer_json_matches_byte_tokenizer(byte_export, tmp_path, context):
    """tokenizers.Tokenizer.from_file on the export: ByteTokenizer's rows for random texts,
    including truncation (mid-character too) and padding to the context length."""
    from tokenizers import Tokenizer

    ByteTokenizer(context).save_pretrained(tmp_path)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = ByteTokenizer(context)
    texts = _random_texts(random.Random(context), 3000) + [
        "",
        "   ",
        "ΟΔΟΣ ΣΟΦΙΑΣ",
        "ΑΣ'Σ",
        "x<|endoftext|>y<|startoftext|><pad>",
        "İSTANBUL",
    ]
    got, want = _hf_ids(hf, texts), ours(texts)
    bad = [t for t, g, w in zip(texts, got, want, strict=True) if not np.array_equal(g, w)]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[:3]!r}"
    if context == 16:  # the run's own export says the same
        exported = Tokenizer.from_file(str(byte_export / "tokenizer.json"))
        np.testing.assert_array_equal(_hf_ids(exported, texts), want)


PER_ROW = 300  # pieces of at most 10 bytes + a space: 3300 bytes, inside the 4096 context


def _rows(texts: list[str], per_row: int = PER_ROW) -> list[str]:
    """Many short texts per row: a space stops every case context, so each piece is
    lower-cased as it would be alone (whitespace characters are tested apart)."""
    return [" ".join(texts[i : i + per_row]) for i in range(0, len(texts), per_row)]


# Python 3.11 has Unicode 14 and tokenizers Unicode 16: U+1171E became a spacing mark (Mc,
# no longer case-ignorable) in Unicode 15, so a Σ beside it takes another form there.
UNICODE_DRIFT = {"\U0001171e"}


def test_byte_tokenizer_json_on_every_code_point():
    """Every code point Python's Unicode database assigns, alone and in each final-sigma
    context, tokenizes as ByteTokenizer does, but for UNICODE_DRIFT; of the code points it does
    not assign (planes 0-3, where Unicode 15 and 16 added letters), only letters with case in
    tokenizers' newer tables differ."""
    hf, ours = ByteTokenizer(4096).to_hf(), ByteTokenizer(4096)

    def differing(pieces: list[str]) -> list[int]:  # one at a time, in a short context
        got, want = _hf_ids(ByteTokenizer(16).to_hf(), pieces), ByteTokenizer(16)(pieces)
        return list(np.nonzero((got != want).any(axis=1))[0])

    points = [chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    points = [c for c in points if not c.isspace()]
    assigned = [c for c in points if unicodedata.category(c) not in ("Cn", "Co")]
    unassigned = [c for c in points[:0x40000] if unicodedata.category(c) == "Cn"]
    contexts = {
        "alone": lambda c: c,
        "between a letter and Σ": lambda c: "Α" + c + "Σ",
        "between a digit and Σ": lambda c: "1" + c + "Σ",
        "after Σ": lambda c: "ΑΣ" + c,
        "between Σ and a letter": lambda c: "ΑΣ" + c + "Α",
    }
    for name, make in contexts.items():
        pieces = [make(c) for c in assigned]
        rows = _rows(pieces)
        got, want = _hf_ids(hf, rows), ours(rows)
        assert (want[:, -1] == 0).all()  # nothing truncated
        differ = set()
        for row in np.nonzero((got != want).any(axis=1))[0]:
            start = row * PER_ROW
            differ |= {assigned[start + i] for i in differing(pieces[start : start + PER_ROW])}
        assert differ <= UNICODE_DRIFT, (name, sorted(f"U+{ord(c):04X}" for c in differ))
    from tokenizers.normalizers import Lowercase

    got, want = _hf_ids(hf, _rows(unassigned)), ours(_rows(unassigned))
    differ = []
    for row in np.nonzero((got != want).any(axis=1))[0]:
        chunk = unassigned[row * PER_ROW : (row + 1) * PER_ROW]
        differ += [chunk[i] for i in differing(chunk)]
    assert all(c.lower() == c != Lowercase().normalize_str(c) for c in differ), differ


def test_byte_tokenizer_json_decodes_like_byte_tokenizer(byte_export):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(byte_export / "tokenizer.json"))
    ours = ByteTokenizer(16)
    for text in ["Hello,  World!", "café 🐶", "", "ΟΔΟΣ", "a<pad>b"]:
        ids = ours(text)[0]
        assert hf.decode(ids.tolist()) == ours.decode(ids), text


def test_transformers_reads_the_byte_export(byte_export):
    """AutoProcessor gives a CLIPProcessor over the tokenizer.json, which pads and truncates
    when asked (as transformers tokenizers do) and then gives ByteTokenizer's rows, literal
    special names included."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(byte_export)
    texts = _random_texts(random.Random(1), 200) + ["x<pad>y", "<|endoftext|>", EOT_TOKEN * 3]
    got = processor(text=texts, padding="max_length", truncation=True, return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], ByteTokenizer(16)(texts))


def test_load_tokenizer_knows_a_byte_export(byte_export):
    assert isinstance(load_tokenizer(byte_export), ByteTokenizer)
    assert isinstance(load_tokenizer(byte_export / "tokenizer.json"), ByteTokenizer)
    with pytest.raises(ValueError, match="tokenizer.json: is fomo_jax's byte tokenizer"):
        ClipTokenizer.from_files(byte_export)


# ----------------------------------------------------------------------------------- OpenCLIP
def test_openclip_export_equals_an_independent_renaming(tmp_path):
    """HF model -> load_pretrained -> export_openclip gives, key for key and bit for bit, the
    state dict the test's own renaming makes from the HF model (no `attn_mask`: OpenCLIP's is
    a non-persistent buffer)."""
    hf_model = make_hf_clip("gelu_3x3")
    hf_model.save_pretrained(tmp_path / "hf")
    path = tmp_path / "open_clip_model.safetensors"
    assert models.export_openclip(models.load_pretrained(tmp_path / "hf"), path) is None
    want = {k: v.numpy() for k, v in openclip_state_dict(hf_model).items() if k != "attn_mask"}
    got = load_file(path)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == np.float32, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # The heads the weights cannot tell (3 and 4, not 64-dim) come back from the metadata.
    back = models.load_pretrained(path)
    assert (back.config.vision.heads, back.config.text.heads) == (3, 4)


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(), "tiny"),
        (dict(activation="quick_gelu"), "tiny-quickgelu"),  # OpenAI's QuickGELU convention
        (dict(activation="gelu_tanh", layer_norm_eps=1e-6), None),  # no variant: metadata only
    ],
)
def test_openclip_round_trip_is_bitwise(tmp_path, overrides, name):
    model = _tiny(seed=5, **overrides)
    path = tmp_path / "model.safetensors"
    assert models.export_openclip(model, path) == name
    with safe_open(path, framework="numpy") as f:
        assert f.metadata().get("model_name") == name
    back = models.load_pretrained(path)
    assert back.config == model.config
    want, got = _param_bits(model), _param_bits(back)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_openclip_arguments_override_the_recorded_architecture(tmp_path):
    path = tmp_path / "model.safetensors"
    models.export_openclip(_tiny(activation="quick_gelu"), path)
    assert models.load_pretrained(path, activation="gelu").config.activation == "gelu"
    assert models.load_pretrained(path, heads=(4, 1)).config.vision.heads == 4
    with pytest.raises(ValueError, match=r"\*\.safetensors"):
        models.export_openclip(_tiny(), tmp_path / "model.bin")
