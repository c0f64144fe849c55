"""Greedy decoding with the KV cache for `LanguageModel` and `VisionLanguageModel`.

    out = greedy_generate(model, token_ids, attention_mask, max_new_tokens=32,
                          stop_tokens=(eos,), images=pixels, image_valid=has_image)
    out.tokens   # int32 [B, max_new_tokens]: pad_id after a row's stop token
    out.lengths  # int32 [B]: tokens generated per row, the stop token included

Prompts are `token_ids` [B, T] with `attention_mask` [B, T] (1 = token, 0 = padding), padded on
the left or on the right. Positions follow Hugging Face's `generate`: a token's position is the
number of real tokens before it (cumsum(mask) - 1), so a left-padded row decodes exactly as the
same row without padding. The cache has T + max_new_tokens slots: the prompt fills slots
0..T-1 (its pads stay masked for good), and the k-th new token of every row goes to slot T + k at
position (row length) + k, so right-padded rows also continue from their own length.

Images (VLM only) belong to the prompt: they are fused in the prefill, and decoding steps feed
text tokens only (a generated image-token id is embedded as text, as in HF's LLaVA).

A row stops after emitting any of `stop_tokens`; the loop ends when every row has stopped or
after `max_new_tokens`. The prefill and the decoding loop (`lax.while_loop`) are one jitted
function of (model structure, weights, arrays), compiled once per model structure, input shapes
and `max_new_tokens`; stop tokens (up to 8 ids per compile) and the pad id are traced values, so
changing them does not recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fomo_jax.models.llama import init_cache
from fomo_jax.models.vlm import check_image_tokens


class Generation(NamedTuple):
    tokens: jax.Array  # int32 [B, max_new_tokens]; pad_id after a row's stop token
    lengths: jax.Array  # int32 [B]; tokens generated per row, its stop token included


def prompt_positions(attention_mask) -> jax.Array:
    """HF's positions: the number of real tokens before each one (pads get 0; they are masked)."""
    return jnp.maximum(jnp.cumsum(jnp.asarray(attention_mask, jnp.int32), axis=1) - 1, 0)


def greedy_generate(
    model,
    token_ids,
    attention_mask=None,
    *,
    max_new_tokens: int,
    stop_tokens: int | Sequence[int] = (),
    pad_id: int = 0,
    images=None,
    image_valid=None,
) -> Generation:
    """Greedy continuation of a batch of prompts (see the module docstring).

    model: a `LanguageModel` or a `VisionLanguageModel`. token_ids, attention_mask: [B, T]
    (default: no padding). images, image_valid: the VLM's prompt images, as its `__call__`
    takes them.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected at least 1")
    token_ids, mask = _prompt(model, token_ids, attention_mask, images, image_valid)
    stops = _stop_array(stop_tokens)
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, token_ids, mask, images, image_valid, stops, jnp.int32(pad_id),
        max_new_tokens=max_new_tokens,
    )  # fmt: skip


def prefill(model, token_ids, attention_mask=None, *, cache_length: int, images=None,
            image_valid=None):  # fmt: skip
    """(logits [B, V] of each row's next token, KV cache of `cache_length` slots): the jitted
    first half of `greedy_generate`, on its own for benchmarks and custom decoding loops."""
    token_ids, mask = _prompt(model, token_ids, attention_mask, images, image_valid)
    graphdef, state = nnx.split(model)
    return _prefill_jit(
        graphdef, state, token_ids, mask, images, image_valid, cache_length=cache_length
    )


def _prompt(model, token_ids, attention_mask, images, image_valid):
    """Checks that need concrete values, done before tracing: every row has a token, and the
    image tokens match the images."""
    token_ids = jnp.asarray(token_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = np.ones(token_ids.shape, bool)
    mask = jnp.asarray(attention_mask, bool)
    if mask.shape != token_ids.shape:
        raise ValueError(f"attention_mask {mask.shape} does not match token_ids {token_ids.shape}")
    if not bool(jnp.all(jnp.any(mask, axis=1))):
        raise ValueError("every prompt needs at least one token (a row of attention_mask is 0)")
    if images is not None:
        if not hasattr(model.config, "image_token_id"):
            raise TypeError(f"images given to a {type(model).__name__}, which takes text only")
        valid = np.ones(np.shape(images)[:-3], bool) if image_valid is None else image_valid
        cfg = model.config
        check_image_tokens(token_ids, cfg.image_token_id, int(np.sum(valid)), cfg.image_seq_length)
    return token_ids, mask


def _stop_array(stop_tokens) -> jax.Array:
    """The stop ids padded with -1 (never an argmax) to a multiple of 8, so that stop sets of
    different sizes share one compiled loop."""
    stops = np.atleast_1d(np.asarray(stop_tokens, np.int32))
    padded = np.full(-(-max(stops.size, 1) // 8) * 8, -1, np.int32)
    padded[: stops.size] = stops
    return jnp.asarray(padded)


def _forward(model, token_ids, images=None, image_valid=None, **kwargs):
    if images is None:  # a decoding step, or a text-only prompt
        return model(token_ids, **kwargs)
    return model(token_ids, images, image_valid=image_valid, **kwargs)


def _prefill(model, token_ids, mask, images, image_valid, cache_length):
    """The prompt written to cache slots 0..T-1; logits at each row's last real token."""
    batch, length = token_ids.shape
    cache = init_cache(model.lm.cfg, batch, cache_length)
    logits, cache = _forward(
        model, token_ids, images, image_valid,
        attention_mask=mask, positions=prompt_positions(mask), cache=cache,
    )  # fmt: skip
    last = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # right padding: before the pads
    return logits[jnp.arange(batch), last], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length"))
def _prefill_jit(graphdef, state, token_ids, mask, images, image_valid, *, cache_length):
    model = nnx.merge(graphdef, state)
    return _prefill(model, token_ids, mask, images, image_valid, cache_length)


class _Loop(NamedTuple):
    step: jax.Array  # k: new tokens emitted so far (a stopped row emits pads)
    newest: jax.Array  # [B] the argmax of step k - 1, fed next (a real id even after a stop)
    cache: list
    tokens: jax.Array  # [B, max_new_tokens]
    done: jax.Array  # [B] bool: the row has emitted a stop token
    lengths: jax.Array  # [B]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _generate(graphdef, state, token_ids, mask, images, image_valid, stops, pad_id, *,
              max_new_tokens):  # fmt: skip
    model = nnx.merge(graphdef, state)
    batch, length = token_ids.shape
    logits, cache = _prefill(model, token_ids, mask, images, image_valid, length + max_new_tokens)
    first = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    prompt_lengths = jnp.sum(mask, axis=1, dtype=jnp.int32)
    new_slots = jnp.arange(max_new_tokens)

    def decode_one(loop: _Loop) -> _Loop:
        # Token k - 1 goes to slot T + k - 1 at position length + k - 1; it sees the prompt's
        # real tokens and the new tokens so far (itself included).
        k = loop.step
        new_valid = jnp.broadcast_to(new_slots < k, (batch, max_new_tokens))
        logits, cache = _forward(
            model, loop.newest[:, None],
            attention_mask=jnp.concatenate([mask, new_valid], axis=1),
            positions=(prompt_lengths + k - 1)[:, None], cache=loop.cache,
            cache_index=length + k - 1,
        )  # fmt: skip
        newest = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        token = jnp.where(loop.done, pad_id, newest)
        return _Loop(
            step=k + 1,
            newest=newest,
            cache=cache,
            tokens=jax.lax.dynamic_update_slice_in_dim(loop.tokens, token[:, None], k, axis=1),
            done=loop.done | jnp.isin(token, stops),
            lengths=loop.lengths + (~loop.done).astype(jnp.int32),
        )

    def running(loop: _Loop):
        return (loop.step < max_new_tokens) & ~jnp.all(loop.done)

    start = _Loop(
        step=jnp.int32(1),
        newest=first,
        cache=cache,
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first),
        done=jnp.isin(first, stops),
        lengths=jnp.ones((batch,), jnp.int32),
    )
    end = jax.lax.while_loop(running, decode_one, start)
    return Generation(tokens=end.tokens, lengths=end.lengths)
