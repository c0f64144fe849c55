"""The reservoir buffer, ER / DER / DER++ and ZSCL (spec §8.5) against independent references.

The reservoir and the replay draw are checked statistically and against a one-at-a-time
reference; the losses against float64 numpy on embeddings from a separately jitted forward
pass, always at the model's temperature exp(logit_scale). Each method's step is compiled once
per module; one run through the runner covers ER's hooks and the buffer in checkpoints.
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fomo_jax import params as params_lib
from fomo_jax import sharding
from fomo_jax.configs import fif_synth as fif_synth_config
from fomo_jax.continual import methods, runner
from fomo_jax.continual.checkpoints import Checkpoints
from fomo_jax.continual.methods import replay
from fomo_jax.data import mixture
from fomo_jax.families import clip
from fomo_jax.tokenizer import load_tokenizer
from fomo_jax.train import optimizer
from fomo_jax.train.losses import clip_loss
from fomo_jax.train.step import TrainState, shardings_of, step_fn

B = 8
MIXTURE = {"pretraining": 0.25, "update": 0.5, "buffer": 0.25}  # n_p = 3 at task 0, then 2


def micro_config():
    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "batch_size": B,
            "num_tasks": 2,
            "mixture": dict(MIXTURE),
            "optimizer": {"clip_norm": 1.0},
        }  # fmt: skip
    )


def random_batch(rng, cfg, n=B):
    size, length = cfg.vision.image_size, cfg.text.context_length
    ids = rng.integers(1, 250, (n, length)).astype(np.int32)  # every position used
    ids[:, -1] = 258  # EOT: the row maximum
    return {"images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), "token_ids": ids}


def normalized(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_clip_loss(image, text, scale):
    """float64 CLIP loss of normalised embeddings with the logits multiplied by `scale`."""
    logits = scale * normalized(image) @ normalized(text).T

    def ce(z):
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(log_p))

    return 0.5 * (ce(logits) + ce(logits.T))


def flat(tree):
    return {k: np.asarray(v) for k, v in params_lib.flatten(jax.device_get(tree)).items()}


@pytest.fixture(scope="module")
def micro(tiny_model):
    cfg = tiny_model.config
    graphdef, theta0 = params_lib.split(tiny_model)
    theta0 = jax.device_get(theta0)
    forward = clip.forward(graphdef)
    embed = jax.jit(lambda p, b: forward(p, b)[:2])  # the reference's own forward (batch of 8)
    return cfg, graphdef, theta0, forward, embed


class Harness:
    """One method on the micro config with its step compiled once (no donation)."""

    def __init__(self, name, micro, data=None, steps_per_task=4, **overrides):
        cfg, graphdef, theta0, forward, _ = micro
        self.theta0 = theta0
        self.method = methods.get(name, overrides or None)
        self.method.setup(methods.Context(
            config=micro_config(), family=clip.FAMILY, model_config=cfg,
            tokenizer=load_tokenizer("bytes", context_length=cfg.text.context_length),
            data=data or methods.NoData(), workdir="", steps_per_task=steps_per_task,
        ))  # fmt: skip
        self.tx = optimizer.adamw()
        self.step = jax.jit(functools.partial(
            step_fn, loss_fn=clip.FAMILY.loss(graphdef), tx=self.tx, method=self.method,
            family=clip.FAMILY,
        ))  # fmt: skip

    def state(self, params, method_state):
        key = jax.random.key_data(jax.random.key(0))
        return TrainState(jnp.int32(0), params, self.tx.init(params), method_state, key)


# ------------------------------------------------------------------------------- the losses


def test_masked_clip_loss_is_clip_loss_of_the_valid_rows():
    rng = np.random.default_rng(0)
    image, text = rng.standard_normal((2, 6, 5)).astype(np.float32)
    scale = jnp.float32(2.3)
    all_valid = replay.masked_clip_loss(image, text, scale, jnp.ones(6, bool))[0]
    np.testing.assert_allclose(all_valid, clip_loss(image, text, scale)[0], rtol=1e-6)
    mask = np.array([True, False, True, True, False, True])
    got = replay.masked_clip_loss(image, text, scale, jnp.asarray(mask))[0]
    np.testing.assert_allclose(got, clip_loss(image[mask], text[mask], scale)[0], rtol=1e-6)
    np.testing.assert_allclose(got, numpy_clip_loss(image[mask], text[mask], np.exp(2.3)), 1e-5)

    def none_valid(image):
        return replay.masked_clip_loss(image, text, scale, jnp.zeros(6, bool))[0]

    assert float(none_valid(image)) == 0.0
    assert np.all(np.isfinite(jax.grad(none_valid)(image)))


# ---------------------------------------------------------------------------- the reservoir


def test_reservoir_inclusion_is_uniform_over_the_stream():
    """5,000 sample ids through a 50-slot reservoir in batches of 100, 2,000 times: every
    sample ends in the buffer with probability 50/5,000 wherever it was in the stream."""
    capacity, batch, batches, runs = 50, 100, 50, 2000

    def one_run(key):
        buffer = {"ids": jnp.full((capacity,), -1, jnp.int32), "seen": jnp.int32(0)}

        def body(buffer, i):
            ids = i * batch + jnp.arange(batch, dtype=jnp.int32)
            return replay.reservoir_insert(buffer, {"ids": ids}, jax.random.fold_in(key, i)), None

        return jax.lax.scan(body, buffer, jnp.arange(batches))[0]

    final = jax.jit(jax.vmap(one_run))(jax.random.split(jax.random.key(0), runs))
    ids = np.asarray(final["ids"])
    assert np.all(np.asarray(final["seen"]) == batch * batches)
    assert np.all(ids >= 0)  # full
    assert all(len(np.unique(row)) == capacity for row in ids)  # no sample twice
    # Inclusion counts per block of 100 consecutive stream positions: chi-square, 49 dof.
    counts = np.bincount(ids.ravel() // 100, minlength=50)
    expected = runs * capacity / 50
    chi2 = np.sum((counts - expected) ** 2 / expected)
    assert chi2 < 85.4, (chi2, counts)  # the 0.1% critical value of chi2(49)
    # Per sample: binomial(2000, 0.01) — mean 20; the first and the last batch alike.
    per_sample = np.bincount(ids.ravel(), minlength=batch * batches)
    assert abs(per_sample[:batch].mean() - 20) < 2 and abs(per_sample[-batch:].mean() - 20) < 2


def test_reservoir_batch_insertion_equals_one_at_a_time():
    """Same random draws, inserted sample by sample: the batched scatter (later samples win
    on a shared slot) gives exactly the sequential reservoir."""
    capacity, batch = 5, 8
    buffer = {"ids": jnp.full((capacity,), -1, jnp.int32), "seen": jnp.int32(0)}
    reference, seen = [-1] * capacity, 0
    for step in range(6):
        key = jax.random.key(step)
        ids = jnp.arange(batch, dtype=jnp.int32) + step * batch
        n = seen + np.arange(batch)
        draws = np.asarray(jax.random.randint(key, (batch,), 0, jnp.asarray(n + 1, jnp.int32)))
        for i in range(batch):
            if n[i] < capacity:
                reference[n[i]] = int(ids[i])
            elif draws[i] < capacity:
                reference[draws[i]] = int(ids[i])
        seen += batch
        buffer = replay.reservoir_insert(buffer, {"ids": ids}, key)
        assert np.asarray(buffer["ids"]).tolist() == reference
        assert int(buffer["seen"]) == seen


def test_replay_draw_is_without_replacement_and_masked():
    capacity, size = 10, 6
    for seen in (0, 3, 6, 25):
        counts = np.zeros(capacity)
        for k in range(300):
            idx, valid = replay.replay_indices(jnp.int32(seen), capacity, size, jax.random.key(k))
            idx, valid = np.asarray(idx), np.asarray(valid)
            filled = min(seen, capacity)
            assert valid.sum() == min(filled, size) and np.all(valid[: valid.sum()])
            assert len(np.unique(idx[valid])) == valid.sum()  # without replacement
            assert np.all(idx[valid] < filled)  # only filled slots
            counts[idx[valid]] += 1
        if filled:  # every filled slot equally likely: 300·min(filled, size)/filled each
            want = 300 * min(filled, size) / filled
            assert np.all(np.abs(counts[:filled] - want) < 5 * np.sqrt(want) + 1e-9)


# ---------------------------------------------------------------------------- ER, DER, DER++


WEIGHTS = {"er": (1.0, 0.0), "der": (0.0, 0.3), "derpp": (0.5, 0.1)}  # (replay CLIP, DER)


@pytest.fixture(scope="module")
def harnesses(micro):
    return {name: Harness(name, micro, buffer_size=B) for name in WEIGHTS}


def filled_buffer(cfg, rng, seen):
    """A capacity-8 buffer whose first `seen` slots hold random samples and features."""
    size, length = cfg.vision.image_size, cfg.text.context_length
    sample = {"images": jax.ShapeDtypeStruct((size, size, 3), np.uint8),
              "token_ids": jax.ShapeDtypeStruct((length,), np.int32)}  # fmt: skip
    buffer = jax.device_get(replay.empty_buffer(B, sample, cfg.embed_dim))
    buffer = {k: np.array(v) for k, v in buffer.items()}
    sample = random_batch(rng, cfg, n=seen)
    buffer["images"][:seen], buffer["token_ids"][:seen] = sample["images"], sample["token_ids"]
    for key in ("image_features", "text_features"):
        buffer[key][:seen] = normalized(rng.standard_normal((seen, cfg.embed_dim)))
    buffer["seen"] = np.int32(seen)
    return buffer


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_replay_losses_match_numpy_at_the_model_temperature(name, harnesses, micro):
    cfg, _, theta0, _, embed = micro
    h = harnesses[name]
    rng = np.random.default_rng(1)
    seen = 5  # fewer than the replay batch of 8: the last 3 rows are masked
    buffer = filled_buffer(cfg, rng, seen)
    batch = random_batch(rng, cfg)
    state, metrics = h.step(h.state(theta0, {"buffer": buffer}), batch, 1e-3)

    scale = np.exp(np.float64(theta0["logit_scale"]))
    image, text = embed(theta0, batch)
    main = numpy_clip_loss(image, text, scale)
    stored = {"images": buffer["images"], "token_ids": buffer["token_ids"]}
    r_image, r_text = (np.asarray(x)[:seen] for x in embed(theta0, stored))
    replay_clip = numpy_clip_loss(r_image, r_text, scale)
    s_new = normalized(r_image) @ normalized(r_text).T
    s_old = buffer["image_features"][:seen] @ buffer["text_features"][:seen].T
    der = np.mean((s_new - s_old) ** 2)
    clip_weight, der_weight = WEIGHTS[name]
    assert float(metrics["replay_valid"]) == seen
    np.testing.assert_allclose(float(metrics["clip_loss"]), main, rtol=1e-4)
    if clip_weight:
        np.testing.assert_allclose(float(metrics["replay_clip_loss"]), replay_clip, rtol=1e-4)
        # τ = 1 (the reference's bug) is a different loss.
        assert abs(numpy_clip_loss(r_image, r_text, 1.0) - replay_clip) > 0.1
    if der_weight:
        np.testing.assert_allclose(float(metrics["der_loss"]), der, rtol=1e-4)
    want = main + clip_weight * replay_clip + der_weight * der
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-4)

    # Inserted after the loss: samples 5, 6, 7 of the stream fill the free slots, samples
    # 8 … 12 (batch rows 3 … 7) may replace any slot; stored features are the normalised
    # embeddings of the step's own forward pass.
    new = jax.device_get(state.method_state["buffer"])
    assert int(new["seen"]) == seen + B
    for slot in range(B):
        rows = [
            i for i in range(B) if np.array_equal(new["token_ids"][slot], batch["token_ids"][i])
        ]
        if not rows:  # an old sample, untouched
            assert slot < seen
            np.testing.assert_array_equal(new["images"][slot], buffer["images"][slot])
            continue
        (i,) = rows
        assert i == slot - seen or i >= B - seen, (slot, i)
        np.testing.assert_array_equal(new["images"][slot], batch["images"][i])
        # Two programs (the step, this forward): equal to float noise, not bitwise; a
        # component near 0 needs the atol (unit vectors: a wrong row differs by ~0.1).
        for key, features in (("image_features", image), ("text_features", text)):
            np.testing.assert_allclose(new[key][slot], normalized(features)[i], rtol=1e-5,
                                       atol=1e-6)  # fmt: skip


def test_first_step_replays_nothing_and_stores_full_token_rows(harnesses, micro):
    cfg, _, theta0, _, _ = micro
    h = harnesses["derpp"]
    batch = random_batch(np.random.default_rng(2), cfg)
    state, metrics = h.step(h.state(theta0, h.method.init_state(theta0)), batch, 1e-3)
    assert float(metrics["replay_valid"]) == 0
    assert float(metrics["replay_clip_loss"]) == 0 and float(metrics["der_loss"]) == 0
    assert float(metrics["loss"]) == float(metrics["clip_loss"])
    buffer = jax.device_get(state.method_state["buffer"])
    assert buffer["token_ids"].shape == batch["token_ids"].shape  # the full context
    np.testing.assert_array_equal(buffer["token_ids"], batch["token_ids"])
    np.testing.assert_array_equal(buffer["images"], batch["images"])


def test_buffer_round_trips_through_checkpoints(harnesses, micro, tmp_path):
    cfg, _, theta0, _, _ = micro
    h = harnesses["er"]
    state = h.state(theta0, {"buffer": filled_buffer(cfg, np.random.default_rng(3), 6)})
    state, _ = h.step(state, random_batch(np.random.default_rng(4), cfg), 1e-3)
    mesh = sharding.make_mesh()
    abstract = jax.eval_shape(lambda s: s, state)
    checkpoints = Checkpoints(str(tmp_path / "checkpoints"))
    checkpoints.save(1, state, {"task": 0, "step": 1}, {"note": "record"})
    restored, position, record = checkpoints.restore(
        1, abstract, shardings_of(abstract, mesh, sharding.CLIP_RULES)
    )
    checkpoints.close()
    assert position == {"task": 0, "step": 1} and record == {"note": "record"}
    want = jax.device_get(state.method_state["buffer"])
    got = jax.device_get(restored.method_state["buffer"])
    for key in want:
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert got["images"].dtype == np.uint8 and int(got["seen"]) == 6 + B


# ------------------------------------------------------------------------------------ ZSCL


CAPTIONS = [f"a synthetic caption number {i}" for i in range(20)]


@pytest.fixture(scope="module")
def zscl(micro):
    pool = [{"text": t, "image": b""} for t in CAPTIONS]
    data = runner.Data(
        root="",
        datasets={},
        catalogue=None,
        pool=pool,
        tasks=[],
        config=None,
        batch_keys=(),
        tokenizer=None,
        image_size=0,
    )  # only the pool is read
    return Harness("zscl", micro, data=data, num_reference_texts=B, we_freq=2)


def numpy_distillation(zero_shot_image, image, reference, logit_scale, temp=2.0):
    tau_d = np.exp(-np.float64(logit_scale)) * temp
    z0 = normalized(zero_shot_image) @ reference.T / tau_d
    z = normalized(image) @ reference.T / tau_d

    def ce(teacher, student):  # along rows
        p = np.exp(teacher - teacher.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        s = student - student.max(1, keepdims=True)
        log_q = s - np.log(np.exp(s).sum(1, keepdims=True))
        return -np.mean(np.sum(p * log_q, axis=1))

    return (ce(z0, z) + ce(z0.T, z.T)) * tau_d**2


def test_zscl_reference_texts_are_the_pools_last_captions(zscl, micro, tmp_path):
    cfg, _, theta0, _, embed = micro
    assert zscl.method.reference_texts() == CAPTIONS[-B:]
    state = zscl.method.init_state(theta0)
    ids = zscl.method.ctx.tokenizer(CAPTIONS[-B:])
    images = np.zeros((B, cfg.vision.image_size, cfg.vision.image_size, 3), np.uint8)
    want = normalized(embed(theta0, {"images": images, "token_ids": ids})[1])  # zero-shot text
    np.testing.assert_allclose(np.asarray(state["reference"]), want, rtol=1e-5, atol=1e-6)
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(["one caption", "another"]))
    other = methods.get("zscl", {"reference_texts": str(path)})
    other.setup(zscl.method.ctx)
    assert other.reference_texts() == ["one caption", "another"]


def test_zscl_loss_matches_numpy(zscl, micro):
    cfg, _, theta0, _, embed = micro
    rng = np.random.default_rng(5)
    params = jax.tree_util.tree_map(
        lambda p: p + 0.02 * rng.standard_normal(p.shape).astype(np.float32), theta0
    )
    start = jax.tree_util.tree_map(
        lambda p: p + 0.01 * rng.standard_normal(p.shape).astype(np.float32), theta0
    )
    state0 = dict(zscl.method.init_state(theta0), start=start)
    assert int(state0["n_pretraining"]) == 3  # task 0 (spec §4.2 with the [FIX])
    batch = random_batch(rng, cfg)
    image, text = embed(params, batch)
    zero_shot_image = embed(theta0, batch)[0]
    reference = np.asarray(state0["reference"], np.float64)
    scale = np.float64(params["logit_scale"])
    p, s = flat(params), flat(start)
    l2 = sum(np.sum((p[k].astype(np.float64) - s[k]) ** 2) for k in p)
    for n_p in (3, 2):  # task 0, then later tasks: the slice size is data, not a recompile
        state = dict(state0, n_pretraining=jnp.int32(n_p))
        _, metrics = zscl.step(zscl.state(params, state), batch, 1e-3)
        clip = numpy_clip_loss(image[: B - n_p], text[: B - n_p], np.exp(scale))
        distill = numpy_distillation(zero_shot_image[B - n_p :], image[B - n_p :], reference, scale)
        np.testing.assert_allclose(float(metrics["clip_loss"]), clip, rtol=1e-4)
        np.testing.assert_allclose(float(metrics["zscl_distillation"]), distill, rtol=1e-4)
        np.testing.assert_allclose(float(metrics["zscl_l2"]), l2, rtol=1e-4)
        np.testing.assert_allclose(float(metrics["loss"]), clip + distill + l2, rtol=1e-4)
        # The CLIP term never sees the pretraining slice's texts.
        changed = dict(batch, token_ids=batch["token_ids"].copy())
        changed["token_ids"][B - n_p :] = random_batch(rng, cfg, n=n_p)["token_ids"]
        _, other = zscl.step(zscl.state(params, state), changed, 1e-3)
        np.testing.assert_allclose(float(other["clip_loss"]), float(metrics["clip_loss"]), 1e-6)


def test_zscl_distillation_masks_rows_and_scales():
    rng = np.random.default_rng(7)
    zero_shot, image = rng.standard_normal((2, 6, 5)).astype(np.float32)
    reference = normalized(rng.standard_normal((9, 5))).astype(np.float32)
    valid = np.array([False, False, True, True, True, True])
    scale = np.float32(1.7)
    spec = replay.zscl_distillation(zero_shot, image, reference, scale, valid, 2.0, "spec")
    want = numpy_distillation(zero_shot[valid], image[valid], reference, scale)
    np.testing.assert_allclose(float(spec), want, rtol=1e-4)
    # Zheng et al.'s scaling: temp² instead of τ_d².
    original = replay.zscl_distillation(zero_shot, image, reference, scale, valid, 2.0, "zscl")
    tau_d = 2.0 * np.exp(-np.float64(scale))
    np.testing.assert_allclose(float(original), want / tau_d**2 * 4.0, rtol=1e-4)
    none = replay.zscl_distillation(zero_shot, image, reference, scale, valid & False, 2.0, "spec")
    assert float(none) == 0.0


def test_zscl_weight_ensemble_and_end_of_task(zscl, micro):
    cfg, _, theta0, _, _ = micro
    rng = np.random.default_rng(6)
    state = zscl.state(theta0, zscl.method.init_state(theta0))
    trajectory = [flat(theta0)]
    for _ in range(5):
        state, metrics = zscl.step(state, random_batch(rng, cfg), 1e-3)
        trajectory.append(flat(state.params))
    method_state = state.method_state
    assert int(method_state["snapshots"]) == 2 and int(method_state["step_in_task"]) == 5
    # we_freq = 2: snapshots after steps 2 and 4; W = mean(θ_start, θ_2, θ_4).
    want = {k: (trajectory[0][k] + trajectory[2][k] + trajectory[4][k]) / 3 for k in trajectory[0]}
    got = flat(method_state["ensemble"])
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    params, after = zscl.method.end_of_task(0, state.params, method_state)
    for tree in (params, after["start"], after["ensemble"]):  # W is θ_0 and the next start
        assert all(np.array_equal(v, got[k]) for k, v in flat(tree).items())
    assert int(after["snapshots"]) == 0 and int(after["step_in_task"]) == 0
    want_np = mixture.pool_batch_sizes(B, MIXTURE, 1)["pretraining"]
    assert int(after["n_pretraining"]) == want_np == 2
    assert zscl.method.eval_params(0, params, after) is params


# ------------------------------------------------------------------------------- the runner


def test_er_through_the_runner(smoke_data_root, tmp_path):
    config = fif_synth_config.get_config("smoke")
    config.data.root = smoke_data_root
    config.method = "er"
    config.methods["er"] = {"buffer_size": 40}
    config.checkpoint_every = 0
    results = runner.run(config, str(tmp_path / "run"))
    assert len(results["trajectory"]) == 3
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    seen = {(r["task"], r["step"]): r["buffer_seen"] for r in lines}
    assert seen == {(0, 3): 48, (0, 6): 96, (1, 3): 144, (1, 6): 192}  # B = 16 per step
    valid = {(r["task"], r["step"]): r["replay_valid"] for r in lines}
    assert valid[(0, 3)] == 16 and valid[(1, 6)] == 16  # min(seen, capacity, batch)
