"""Fusion of visual tokens into the LM, `interleave` and `prefix`, against a float64 numpy
reference of the whole decoder: image slots filled in batch order, then RMSNorm, RoPE
(rotate-half), grouped-query attention under a causal or prefix-LM mask with key padding,
SwiGLU and the output head. The image tower and connector are taken as given (the VLM's own
`image_features`; they are checked against transformers elsewhere)."""

import numpy as np
import pytest

from fomo_jax import models
from fomo_jax import params as params_lib
from fomo_jax.models import llama, vlm
from tests import compiled

LM = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       qkv_bias=True)  # fmt: skip
IMAGE = 49


def _reference(params, cfg, ids, features, kv_mask, prefix_length):
    """float64 logits [B, T, V] of the fused sequence."""
    p = {k: np.asarray(v, np.float64) for k, v in params_lib.flatten(params).items()}
    lm, batch, length = cfg.lm, *ids.shape
    hidden = p["lm/embed_tokens/embedding"][ids]
    slots = np.argwhere(ids == IMAGE)  # row-major: the k-th slot takes visual token k
    flat = features.reshape(-1, features.shape[-1])
    hidden[slots[:, 0], slots[:, 1]] = flat[: len(slots)]

    def norm(x, scale):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + lm.rms_norm_eps) * scale

    def linear(x, name, bias=False):
        return x @ p[f"{name}/kernel"] + (p[f"{name}/bias"] if bias else 0)

    inv = 1.0 / lm.rope_theta ** (np.arange(0, lm.head_dim, 2) / lm.head_dim)
    angle = np.arange(length)[:, None] * np.concatenate([inv, inv])[None]  # [T, D]

    def rope(x):  # [B, T, H, D]
        half = lm.head_dim // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * np.cos(angle)[None, :, None] + rotated * np.sin(angle)[None, :, None]

    q_pos, k_pos = np.arange(length)[:, None], np.arange(length)[None, :]
    visible = (k_pos <= q_pos)[None] | (k_pos[None] < prefix_length[:, None, None])
    visible = visible & kv_mask[:, None, :]  # [B, Tq, Tk]
    group = lm.num_attention_heads // lm.num_key_value_heads
    for i in range(lm.num_hidden_layers):
        block = f"lm/transformer/resblocks/{i}"
        x = norm(hidden, p[f"{block}/input_layernorm/scale"])
        shape = (batch, length, -1, lm.head_dim)
        q = rope(linear(x, f"{block}/attn/q_proj", True).reshape(shape))
        k = rope(linear(x, f"{block}/attn/k_proj", True).reshape(shape)).repeat(group, axis=2)
        v = linear(x, f"{block}/attn/v_proj", True).reshape(shape).repeat(group, axis=2)
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(lm.head_dim)
        scores = np.where(visible[:, None], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, -1)
        hidden = hidden + linear(out, f"{block}/attn/o_proj")
        x = norm(hidden, p[f"{block}/post_attention_layernorm/scale"])
        gate = linear(x, f"{block}/mlp/gate_proj")
        hidden = hidden + linear(gate / (1 + np.exp(-gate)) * linear(x, f"{block}/mlp/up_proj"),
                                 f"{block}/mlp/down_proj")  # fmt: skip
    return norm(hidden, p["lm/norm/scale"]) @ p["lm/lm_head/kernel"]


@pytest.mark.parametrize("fusion", ["interleave", "prefix"])
def test_fusion_matches_a_float64_reference(fusion):
    cfg = vlm.VLMConfig(vision=models.get_config("tiny"), lm=LM, image_token_id=IMAGE,
                        fusion=fusion)  # fmt: skip
    model = vlm.create_vlm(cfg, seed=3)
    seq, rng = cfg.image_seq_length, np.random.default_rng(0)
    length = 2 * seq + 9
    ids = rng.integers(1, IMAGE, (3, length)).astype(np.int32)
    ids[0, 2 : 2 + seq] = IMAGE  # row 0: one image after two tokens
    ids[1, 0:seq] = ids[1, seq + 1 : 2 * seq + 1] = IMAGE  # row 1: two images
    # row 2: text only, with three padding positions at the end
    kv_mask = np.ones((3, length), bool)
    kv_mask[2, -3:] = False
    images = rng.normal(size=(3, 2, 32, 32, 3)).astype(np.float32)
    valid = np.array([[True, False], [True, True], [False, False]])
    prefix = np.array([seq + 4, 2 * seq + 3, 5]) if fusion == "prefix" else np.zeros(3, int)
    kwargs = dict(image_valid=valid, attention_mask=kv_mask)
    if fusion == "prefix":
        kwargs["prefix_length"] = prefix
    got = np.asarray(compiled.call(model, ids, images, **kwargs))
    features = np.asarray(compiled.call(model, images[valid], method="image_features"), np.float64)
    want = _reference(params_lib.split(model)[1], cfg, ids, features, kv_mask, prefix)
    real = kv_mask[:, :, None]  # padded positions' outputs are not compared
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=1e-4,
                               atol=1e-4)  # fmt: skip
    if fusion == "prefix":  # the prefix is not causal: a later prompt token moves an earlier one
        changed = ids.copy()
        changed[0, seq + 3] = (changed[0, seq + 3] % 40) + 1
        other = np.asarray(compiled.call(model, changed, images, **kwargs))
        assert not np.allclose(other[0, seq + 2], got[0, seq + 2])
        np.testing.assert_allclose(other[1:], got[1:], rtol=1e-6, atol=1e-6)


def test_prefix_length_goes_with_the_prefix_fusion():
    interleave = vlm.create_vlm(vlm.VLMConfig(vision=models.get_config("tiny"), lm=LM,
                                              image_token_id=IMAGE))  # fmt: skip
    prefix = vlm.create_vlm(vlm.VLMConfig(vision=models.get_config("tiny"), lm=LM,
                                          image_token_id=IMAGE, fusion="prefix"))  # fmt: skip
    ids = np.ones((1, 6), np.int32)
    with pytest.raises(ValueError, match="fusion='prefix' needs prefix_length"):
        prefix(ids)
    with pytest.raises(ValueError, match="prefix_length is for fusion='prefix'"):
        interleave(ids, prefix_length=np.array([3]))
    with pytest.raises(ValueError, match="fusion='xattn'"):
        vlm.VLMConfig(vision=models.get_config("tiny"), lm=LM, image_token_id=IMAGE,
                      fusion="xattn")  # fmt: skip
