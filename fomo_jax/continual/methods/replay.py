"""Replay and distillation methods [EXTRA] (spec §8.5): ER, DER, DER++ and ZSCL.

ER, DER and DER++ share a reservoir buffer that lives in the method state on device, so the
jitted step reads and writes it and checkpoints save it (the reference loses it on resume).
Per sample it stores the uint8 image (as augmented in the batch), the full row of token ids
(the reference truncates every caption to one character), and the current model's normalised
image and text features. Every sample of every training batch is offered to the buffer in
order: the n-th sample (0-based) fills slot n while the buffer is not full, and otherwise
replaces a uniformly random slot with probability capacity / (n + 1).

A step's replay batch is drawn without replacement from the buffer *before* this step's
samples are inserted (insertion happens in `step_update`). Shapes are static under jit, so the
replay batch always has `replay_batch_size` rows (default: the global batch size, capped by
the capacity) and a validity mask; while fewer samples have been seen, the masked losses only
look at the min(seen, size) valid rows. Every CLIP term uses the model's learnable temperature
exp(logit_scale) ([FIX]: the reference uses τ = 1).

- `er`:    L_CLIP(batch) + α·L_CLIP(replay)                          α = 1
- `der`:   L_CLIP(batch) + α·MSE(S_new, S_old) on the replay batch    α = 0.3
- `derpp`: DER term with α plus β·L_CLIP(replay)                      α = 0.1, β = 0.5

S = normalised image features × normalised text features ᵀ of the replay samples (S_old from
the stored features, S_new from the current model), the MSE averaged over its valid entries.

`zscl` (Zheng et al., 2023): distillation towards the frozen zero-shot image tower on the
pretraining slice of the batch, measured through a fixed set of reference captions embedded
once by the zero-shot text tower; the CLIP loss on the other samples only; an L2 anchor to the
task's start weights; and weight ensembling, whose average W is the model after each task.
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_dict

from fomo_jax.continual.methods.base import Method, register
from fomo_jax.continual.methods.regularized import weighted_squared_distance
from fomo_jax.data import mixture
from fomo_jax.families import clip as clip_family
from fomo_jax.train.losses import clip_loss, l2_normalize

_MASKED = -1e9  # logit of a masked entry: exp underflows to 0, and stays finite for gradients


# ---------------------------------------------------------------------------------- losses


def _masked_mean(values, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask > 0, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_clip_loss(image_emb, text_emb, logit_scale, mask):
    """`clip_loss` over the rows where `mask` is set, contrasted among themselves.

    Row i and column i take part iff mask[i]; masked columns are left out of every softmax and
    masked rows out of every mean, so with all rows valid this is `clip_loss`, and with none
    it is 0 (finite, with zero gradients). Returns (loss, metrics).
    """
    image, text = l2_normalize(image_emb), l2_normalize(text_emb)
    logits = jnp.exp(logit_scale.astype(jnp.float32)) * image @ text.T
    both = mask[:, None] & mask[None, :]
    logits = jnp.where(both, logits, _MASKED)
    diag = jnp.arange(logits.shape[0])
    loss_i2t = -_masked_mean(jax.nn.log_softmax(logits, axis=1)[diag, diag], mask)
    loss_t2i = -_masked_mean(jax.nn.log_softmax(logits, axis=0)[diag, diag], mask)
    metrics = {
        "i2t_accuracy": _masked_mean(jnp.argmax(logits, axis=1) == diag, mask),
        "t2i_accuracy": _masked_mean(jnp.argmax(logits, axis=0) == diag, mask),
    }
    return 0.5 * (loss_i2t + loss_t2i), metrics


def masked_similarity_mse(s_new, s_old, mask):
    """Mean of (S_new − S_old)² over entries (i, j) with both rows valid (0 when none)."""
    both = mask[:, None] & mask[None, :]
    return _masked_mean(jnp.square(s_new - s_old), both)


# --------------------------------------------------------------------------- the reservoir


def empty_buffer(capacity: int, sample: dict, embed_dim: int) -> dict:
    """A reservoir of `capacity` samples: every key of a training batch (`sample`: one row's
    shape and dtype per key, e.g. uint8 `images` and int32 `token_ids`) and the image and
    text features the model gave it."""
    buffer = {k: jnp.zeros((capacity, *s.shape), s.dtype) for k, s in sample.items()}
    return buffer | {
        "image_features": jnp.zeros((capacity, embed_dim), jnp.float32),
        "text_features": jnp.zeros((capacity, embed_dim), jnp.float32),
        "seen": jnp.zeros((), jnp.int32),
    }


def reservoir_slots(seen, batch_size: int, capacity: int, key):
    """Where each of `batch_size` new samples goes (`capacity` = dropped).

    Sample i of the batch is sample number n = seen + i of the stream: it takes slot n while
    n < capacity, else slot r ~ U{0..n} if r < capacity. When two samples of one batch pick the
    same slot, the later one wins, exactly as if they were inserted one at a time.
    """
    n = seen + jnp.arange(batch_size, dtype=jnp.int32)
    r = jax.random.randint(key, (batch_size,), 0, n + 1, dtype=jnp.int32)
    slot = jnp.where(n < capacity, n, jnp.where(r < capacity, r, capacity))
    order = jnp.arange(batch_size)
    later_same = (slot[None, :] == slot[:, None]) & (order[None, :] > order[:, None])
    return jnp.where(jnp.any(later_same, axis=1), capacity, slot)


def reservoir_insert(buffer: dict, items: dict, key) -> dict:
    """`buffer` with the samples `items` (arrays with a leading batch axis) offered to it."""
    batch_size = next(iter(items.values())).shape[0]
    capacity = next(v.shape[0] for k, v in buffer.items() if k != "seen")
    slots = reservoir_slots(buffer["seen"], batch_size, capacity, key)
    new = dict(buffer, seen=buffer["seen"] + batch_size)
    for name, values in items.items():
        new[name] = buffer[name].at[slots].set(values.astype(buffer[name].dtype), mode="drop")
    return new


def replay_indices(seen, capacity: int, size: int, key):
    """(indices [size], valid [size]): min(seen, capacity, size) distinct filled slots drawn
    uniformly without replacement, first; the remaining rows are padding (valid False)."""
    filled = jnp.minimum(seen, capacity)
    u = jax.random.uniform(key, (capacity,))
    u = jnp.where(jnp.arange(capacity) < filled, u, 2.0)  # empty slots sort last
    indices = jnp.argsort(u)[:size]
    return indices, jnp.arange(size) < filled


def _image_inputs(batch) -> dict:
    return {k: batch[k] for k in ("images", "pixels") if k in batch}


class _Replay(Method):
    """The reservoir and the losses of ER / DER / DER++; subclasses set the weights."""

    families = ("clip",)  # the buffer stores CLIP features; the losses are CLIP's
    sigmoid_loss = False
    defaults = {
        "buffer_size": 500,
        # None: the global batch size, capped by the buffer size (spec §8.5).
        "replay_batch_size": functools.partial(config_dict.placeholder, int),
    }
    clip_weight_key: str | None = None  # config key of the weight of L_CLIP(replay)
    der_weight_key: str | None = None  # config key of the weight of the DER term

    def setup(self, ctx):
        super().setup(ctx)
        self.capacity = int(self.config.buffer_size)
        if self.capacity < 1:
            raise ValueError(f"{self.name} buffer_size must be >= 1, got {self.capacity}")
        size = self.config.replay_batch_size or ctx.config.batch_size
        self.replay_size = min(int(size), self.capacity)
        self.forward = clip_family.forward(self.graphdef)
        model_config = self.model_config(ctx.model_config)
        batch = ctx.family.abstract_batch(model_config, 1)
        self.sample = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in batch.items()}
        self.embed_dim = model_config.embed_dim

    def init_state(self, params):
        return {"buffer": empty_buffer(self.capacity, self.sample, self.embed_dim)}

    def _weight(self, key):
        return float(self.config[key]) if key else 0.0

    def loss(self, params, state, batch, loss_fn, key):
        if "images" not in batch:
            raise ValueError(f"{self.name} stores uint8 images: the batch needs 'images'")
        buffer = state["buffer"]
        clip_weight = self._weight(self.clip_weight_key)
        der_weight = self._weight(self.der_weight_key)
        indices, valid = replay_indices(
            buffer["seen"], self.capacity, self.replay_size, jax.random.fold_in(key, 1)
        )
        joint = {k: jnp.concatenate([batch[k], buffer[k][indices]]) for k in self.sample}
        image, text, logit_scale = self.forward(params, joint)
        n = batch["token_ids"].shape[0]
        main, metrics = clip_loss(image[:n], text[:n], logit_scale)
        loss = main
        metrics = dict(metrics, clip_loss=main, replay_valid=jnp.sum(valid))
        if clip_weight:
            replay, _ = masked_clip_loss(image[n:], text[n:], logit_scale, valid)
            loss = loss + clip_weight * replay
            metrics["replay_clip_loss"] = replay
        if der_weight:
            s_new = l2_normalize(image[n:]) @ l2_normalize(text[n:]).T
            s_old = buffer["image_features"][indices] @ buffer["text_features"][indices].T
            der = masked_similarity_mse(s_new, s_old, valid)
            loss = loss + der_weight * der
            metrics["der_loss"] = der
        outputs = {
            "image_features": jax.lax.stop_gradient(l2_normalize(image[:n])),
            "text_features": jax.lax.stop_gradient(l2_normalize(text[:n])),
        }
        return loss, metrics, outputs

    def step_update(self, state, params, info):
        items = {k: info.batch[k] for k in self.sample} | {
            "image_features": info.outputs["image_features"],
            "text_features": info.outputs["text_features"],
        }
        buffer = reservoir_insert(state["buffer"], items, jax.random.fold_in(info.key, 2))
        return dict(state, buffer=buffer), {"buffer_seen": buffer["seen"]}


@register
class ER(_Replay):
    """Experience replay: L_CLIP(batch) + α·L_CLIP(replay batch)."""

    name = "er"
    defaults = dict(_Replay.defaults, alpha=1.0)
    clip_weight_key = "alpha"


@register
class DER(_Replay):
    """Dark experience replay: L_CLIP(batch) + α·MSE(S_new, S_old) on the replay batch."""

    name = "der"
    defaults = dict(_Replay.defaults, alpha=0.3)
    der_weight_key = "alpha"


@register
class DERPP(_Replay):
    """DER++: L_CLIP(batch) + α·MSE(S_new, S_old) + β·L_CLIP(replay batch)."""

    name = "derpp"
    defaults = dict(_Replay.defaults, alpha=0.1, beta=0.5)
    clip_weight_key = "beta"
    der_weight_key = "alpha"


# ------------------------------------------------------------------------------------ ZSCL


def soft_cross_entropy(teacher_logits, student_logits, mask, axis: int):
    """CE(softmax(teacher), log_softmax(student)) along `axis`, with masked entries left out of
    both softmaxes; one value per slice along the other axis."""
    teacher = jnp.where(mask, teacher_logits, _MASKED)
    student = jnp.where(mask, student_logits, _MASKED)
    p = jax.nn.softmax(teacher, axis=axis)
    log_q = jax.nn.log_softmax(student, axis=axis)
    return -jnp.sum(jnp.where(mask, p * log_q, 0.0), axis=axis)


def zscl_distillation(zero_shot_image, image, reference, logit_scale, valid, temp, scaling):
    """The ZSCL distillation loss on the valid rows (spec §8.5).

    Z0 = norm(zero-shot image features)·ĝᵀ, Z = norm(current image features)·ĝᵀ, τ_d = τ·temp
    with τ = exp(−logit_scale); CE(softmax(Z0/τ_d), Z/τ_d) along rows (image → reference
    texts, averaged over valid rows) plus along columns (reference text → valid images,
    averaged over the texts), times τ_d² (`scaling="spec"`) or temp² (`"zscl"`). 0 when no
    row is valid.
    """
    tau_d = jnp.exp(-logit_scale.astype(jnp.float32)) * temp
    z0 = l2_normalize(zero_shot_image) @ reference.T / tau_d
    z = l2_normalize(image) @ reference.T / tau_d
    mask = jnp.broadcast_to(valid[:, None], z.shape)
    rows = _masked_mean(soft_cross_entropy(z0, z, mask, axis=1), valid)
    columns = jnp.mean(soft_cross_entropy(z0, z, mask, axis=0)) * jnp.any(valid)
    factor = jnp.square(tau_d) if scaling == "spec" else jnp.float32(temp**2)
    return (rows + columns) * factor


@register
class ZSCL(Method):
    """ZSCL: CLIP loss on the non-pretraining samples + distillation to the zero-shot image
    tower on the pretraining slice + L2 anchor to the task's start, with weight ensembling."""

    name = "zscl"
    families = ("clip",)  # distils through CLIP's zero-shot classifier of reference captions
    sigmoid_loss = False
    defaults = {
        # Reference captions: the last `num_reference_texts` captions of the pretraining pool
        # (the spec's 15,840 CC3M captions are far more than our scale needs), or a JSON list
        # of strings at `reference_texts`.
        "num_reference_texts": 1000,
        "reference_texts": functools.partial(config_dict.placeholder, str),
        "temp": 2.0,  # τ_d = τ·temp
        "l2": 1.0,
        "we_freq": 100,  # steps between weight-ensemble snapshots
        # "spec": the distillation is scaled by τ_d² (spec §8.5); "zscl": by temp², as in
        # Zheng et al.'s code (whose logits carry exp(logit_scale) before dividing by temp).
        "distillation_scaling": "spec",
        "text_batch_size": 256,  # embedding the reference texts
    }

    def setup(self, ctx):
        super().setup(ctx)
        if self.config.distillation_scaling not in ("spec", "zscl"):
            raise ValueError(
                f"zscl distillation_scaling={self.config.distillation_scaling!r}; "
                "expected 'spec' or 'zscl'"
            )
        if int(self.config.we_freq) < 1:
            raise ValueError(f"zscl we_freq must be >= 1, got {self.config.we_freq}")
        if ctx.steps_per_task is not None and ctx.steps_per_task < int(self.config.we_freq):
            logging.warning(
                "zscl: %d steps per task < we_freq=%d: no weight-ensemble snapshot is taken, "
                "so every task ends at its start weights",
                ctx.steps_per_task,
                self.config.we_freq,
            )
        # The pretraining slice is the last n_p samples; n_p changes after task 0 (spec §4.2)
        # while the step is compiled once, so the zero-shot tower sees a static tail of the
        # largest n_p and a mask selects the current task's n_p (`n_pretraining` in the state).
        self.max_pretraining = max(self.pretraining_size(0), self.pretraining_size(1))
        self.forward = clip_family.forward(self.graphdef)
        self._reference = None

    def pretraining_size(self, task: int) -> int:
        config = self.ctx.config
        return mixture.pool_batch_sizes(config.batch_size, dict(config.mixture), task)[
            "pretraining"
        ]

    def reference_texts(self) -> list[str]:
        if self.config.reference_texts:
            with open(self.config.reference_texts) as f:
                texts = json.load(f)
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"{self.config.reference_texts}: expected a JSON list of strings")
        else:
            texts = self.ctx.data.pretraining_texts(int(self.config.num_reference_texts))
        if not texts:
            raise ValueError("zscl: no reference texts")
        return texts

    def embed_texts(self, params, texts: list[str]):
        """ĝ: normalised text embeddings of `texts` by the text tower of `params`."""
        ids = np.asarray(self.ctx.tokenizer(texts), np.int32)
        size = min(int(self.config.text_batch_size), len(ids))
        encode = jax.jit(lambda p, t: l2_normalize(self.forward(p, {"token_ids": t})[1]))
        chunks = []
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            padded = np.concatenate([chunk, np.zeros((size - len(chunk), ids.shape[1]), np.int32)])
            chunks.append(encode(params, padded)[: len(chunk)])
        return jnp.concatenate(chunks)

    def init_state(self, params):
        # The zero-shot text tower embeds the reference texts once (cached: the runner builds
        # the initial state more than once, abstractly first, under `jax.eval_shape`).
        if self._reference is None:
            reference = self.embed_texts(params, self.reference_texts())
            if not isinstance(reference, jax.core.Tracer):
                self._reference = reference
        else:
            reference = self._reference
        return {
            "zero_shot": {"image": params["image"]},
            "reference": reference,
            "start": params,
            "ensemble": params,
            "snapshots": jnp.zeros((), jnp.int32),
            "step_in_task": jnp.zeros((), jnp.int32),
            "n_pretraining": jnp.asarray(self.pretraining_size(0), jnp.int32),
        }

    def loss(self, params, state, batch, loss_fn, key):
        forward = self.forward
        image, text, logit_scale = forward(params, batch)
        b = batch["token_ids"].shape[0]
        n_p = state["n_pretraining"]
        clip, metrics = masked_clip_loss(image, text, logit_scale, jnp.arange(b) < b - n_p)
        tail = min(self.max_pretraining, b)
        distill = jnp.zeros((), jnp.float32)
        if tail:
            zero_shot = dict(params, image=state["zero_shot"]["image"])
            tail_inputs = {k: v[b - tail :] for k, v in _image_inputs(batch).items()}
            zero_shot_image = jax.lax.stop_gradient(forward(zero_shot, tail_inputs)[0])
            valid = jnp.arange(tail) >= tail - n_p
            distill = zscl_distillation(
                zero_shot_image, image[b - tail :], state["reference"], logit_scale, valid,
                float(self.config.temp), self.config.distillation_scaling,
            )  # fmt: skip
        anchor = self.config.l2 * weighted_squared_distance(
            jax.tree_util.tree_map(lambda _: 1.0, params), params, state["start"]
        )
        metrics = dict(metrics, clip_loss=clip, zscl_distillation=distill, zscl_l2=anchor)
        return clip + distill + anchor, metrics, {}

    def step_update(self, state, params, info):
        count = state["step_in_task"] + 1
        snapshot = count % int(self.config.we_freq) == 0
        j = (state["snapshots"] + 1).astype(jnp.float32)
        ensemble = jax.tree_util.tree_map(
            lambda w, p: jnp.where(snapshot, (p + j * w) / (j + 1), w), state["ensemble"], params
        )
        snapshots = state["snapshots"] + snapshot.astype(jnp.int32)
        new = dict(state, ensemble=ensemble, snapshots=snapshots, step_in_task=count)
        return new, {"zscl_snapshots": snapshots}

    def end_of_task(self, task, params, state):
        # [FIX] W is the task's result: evaluated, and the next task trains from it.
        ensemble = state["ensemble"]
        new = dict(
            state,
            start=ensemble,
            ensemble=ensemble,
            snapshots=jnp.zeros((), jnp.int32),
            step_in_task=jnp.zeros((), jnp.int32),
            n_pretraining=jnp.asarray(self.pretraining_size(task + 1), jnp.int32),
        )
        return ensemble, new
