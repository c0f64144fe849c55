"""The decoder LM and the VLM as modules: attention backends, masks, configuration errors.
(Logit parity with transformers: tests/models/test_lm_checkpoints.py.)"""

import numpy as np
import pytest

from fomo_jax import models
from fomo_jax.models import llama, vlm

LM = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip


@pytest.fixture(scope="module")
def lm():
    return llama.create_lm(LM, seed=1)


def test_pallas_kernel_serves_the_lm(lm):
    ids = np.random.default_rng(0).integers(0, 50, (2, 9))
    mask = np.ones((2, 9), bool)
    mask[1, :4] = False  # left padding
    want = np.asarray(lm(ids, attention_mask=mask))
    pallas = llama.create_lm(LM.replace(attention_implementation="pallas"), seed=1)
    got = np.asarray(pallas(ids, attention_mask=mask))
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-5)


def test_padding_and_positions(lm):
    """A left-padded row with HF generate's positions (cumsum of the mask) equals the row alone;
    a right-padded row's real tokens do not see the padding."""
    rng = np.random.default_rng(1)
    row = rng.integers(1, 50, 6)
    alone = np.asarray(lm(row[None]))[0]
    left = np.concatenate([[0, 0, 0], row])[None]
    mask = left != 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    got = np.asarray(lm(left, attention_mask=mask, positions=positions))[0, 3:]
    np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-5)
    right = np.concatenate([row, [7, 7]])[None]
    got = np.asarray(lm(right, attention_mask=np.arange(8)[None] < 6))[0, :6]
    np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-5)


def test_rope_llama3_frequencies_match_a_float64_formula():
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)  # fmt: skip
    cfg = LM.replace(head_dim=32, rope_theta=500000.0, rope_scaling=tuple(scaling.items()))
    got = np.asarray(llama.rope_frequencies(cfg), np.float64)
    base = 1.0 / 500000.0 ** (np.arange(0, 32, 2) / 32)
    want, bands = [], set()
    for f in base:  # Llama 3.1's rule, written per frequency
        wavelength = 2 * np.pi / f
        if wavelength < 64 / 4.0:
            want.append(f)
            bands.add("high frequency: kept")
        elif wavelength > 64 / 1.0:
            want.append(f / 8.0)
            bands.add("low frequency: divided by the factor")
        else:
            smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
            want.append((1 - smooth) * f / 8.0 + smooth * f)
            bands.add("between: interpolated")
    assert len(bands) == 3  # the test covers every branch
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_configuration_errors_name_the_key():
    with pytest.raises(ValueError, match=r"rope_scaling.rope_type='yarn'"):
        LM.replace(rope_scaling=(("rope_type", "yarn"), ("factor", 4.0)))
    with pytest.raises(ValueError, match="hidden_act='tanh'"):
        LM.replace(hidden_act="tanh")
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads=3"):
        LM.replace(num_key_value_heads=3)
    windowed = llama.create_lm(LM.replace(sliding_window=4))
    windowed(np.zeros((1, 4), np.int32))  # within the window
    with pytest.raises(ValueError, match="sliding_window=4 is shorter than the input"):
        windowed(np.zeros((1, 5), np.int32))


def test_vlm_image_token_count_and_text_only_rows():
    cfg = vlm.VLMConfig(vision=models.get_config("tiny"), lm=LM, image_token_id=49)
    model = vlm.create_vlm(cfg)
    seq = cfg.image_seq_length
    assert seq == (32 // 8) ** 2  # tiny ViT: 32 px, 8 px patches, class token dropped
    ids = np.ones((2, seq + 3), np.int32)
    ids[0, 1 : 1 + seq] = 49  # row 0: one image; row 1: text only
    images = np.zeros((2, 32, 32, 3), np.float32)
    logits = model(ids, images, image_valid=[True, False])
    assert logits.shape == (2, seq + 3, 50)
    with pytest.raises(ValueError, match=r"16 image tokens .* but 2 images x .* = 32"):
        model(ids, images)  # both images valid, one run of image tokens
    text_only = np.asarray(model(ids[1:]))
    lm = llama.create_lm(LM)
    lm.lm = model.lm  # the VLM's own decoder
    np.testing.assert_array_equal(text_only, np.asarray(lm(ids[1:])))


def test_block_depth_reads_the_same_on_vlm_paths():
    """LiNeS reads a block's depth per tower from the path: the VLM's towers (`image/...`,
    `lm/...`) each get their own 0..1 ramp, the connector and embeddings none."""
    from fomo_jax import merging
    from fomo_jax import params as params_lib

    cfg = vlm.VLMConfig(vision=models.get_config("tiny"), lm=LM, image_token_id=49)
    paths = list(params_lib.flatten(params_lib.split(vlm.abstract_vlm(cfg))[1]))
    scales = dict(zip(paths, merging.lines_scales(paths, alpha=0.5, beta=0.5), strict=True))
    assert merging.block_index("lm/transformer/resblocks/1/mlp/up_proj/kernel") == (
        "lm/transformer", 1)  # fmt: skip
    assert scales["lm/transformer/resblocks/0/attn/q_proj/kernel"] == 0.5
    assert scales["lm/transformer/resblocks/1/attn/q_proj/kernel"] == 1.0  # the LM's last block
    last_image = models.get_config("tiny").vision.layers - 1
    assert scales[f"image/transformer/resblocks/{last_image}/attn/q_proj/kernel"] == 1.0
    assert scales["connector/linear_1/kernel"] == scales["lm/embed_tokens/embedding"] == 0.5
