"""Learning-rate schedules against spec/fif.md §7.4-7.5: its formulas, evaluated here
independently in numpy float64 at the boundary steps, and its table of per-task peaks."""

import math

import numpy as np
import pytest

from fomo_jax import schedules

LR0, TS, T = 1e-5, 1420, 20
LR_MIN = LR0 * 1e-3


def make(name, steps=TS, tasks=T, **params):
    return schedules.make(name, base_lr=LR0, steps_per_task=steps, num_tasks=tasks, **params)


@pytest.mark.parametrize(
    "steps, warmup",
    [
        (1420, 142),
        (568, 57),
        (284, 29),
        (142, 15),
        (1898, 190),
        (12982, 1299),
        (28400, 2840),
        (30, 3),
    ],  # fmt: skip
)
def test_warmup_length_is_the_exact_rational_ceiling(steps, warmup):
    lr = make("warmup_cosine", steps=steps)
    np.testing.assert_allclose(lr(0, warmup - 1), LR0, rtol=1e-12)  # peak at s = W - 1
    assert lr(0, warmup - 2) < LR0 and lr(0, warmup) < LR0


def test_warmup_cosine_boundaries():
    lr, w, e = make("warmup_cosine"), 142, TS - 142
    np.testing.assert_allclose(lr(0, 0), LR0 / w, rtol=1e-12)
    np.testing.assert_allclose(lr(0, w), LR_MIN + 0.5 * (1 + np.cos(np.pi / e)) * (LR0 - LR_MIN))
    np.testing.assert_allclose(lr(0, TS - 1), LR_MIN, rtol=1e-12)
    for k in (1, 7, 19):  # identical in every task
        assert [lr(k, s) for s in (0, w - 1, w, TS - 1)] == [
            lr(0, s) for s in (0, w - 1, w, TS - 1)
        ]


def test_cosine_constant_multistep():
    s = np.array([0, 1, 709, 1419])
    cos = make("cosine")
    expected = LR_MIN + 0.5 * (LR0 - LR_MIN) * (1 + np.cos(np.pi * s / TS))
    np.testing.assert_allclose([cos(3, int(x)) for x in s], expected, rtol=1e-12)
    assert make("constant")(5, 1000) == LR0
    steps = make("multistep", batch_size=512)
    # milestones 175,000 and 225,000 samples -> steps 341 and 439, recurring every task
    assert [steps(k, s) for k, s in [(0, 340), (0, 341), (0, 438), (0, 439), (1, 0)]] == [
        LR0,
        pytest.approx(LR0 * 0.1),
        pytest.approx(LR0 * 0.1),
        pytest.approx(LR0 * 0.01),
        LR0,
    ]


def test_rsqrt_boundaries():
    lr, w, c = make("rsqrt"), 142, 142
    ref = lambda s: LR_MIN + np.sqrt(w / s) * (LR0 - LR_MIN)  # noqa: E731
    np.testing.assert_allclose(lr(0, w - 1), LR0, rtol=1e-12)
    np.testing.assert_allclose(lr(0, w), ref(w), rtol=1e-12)
    np.testing.assert_allclose(lr(0, TS - c - 1) / LR0, 0.3341, atol=5e-5)  # spec's value
    np.testing.assert_allclose(lr(0, TS - c), ref(TS - c) * (c - 1) / c, rtol=1e-12)
    assert lr(0, TS - 1) == 0.0  # the cooldown reaches 0 at the last step


# Spec §7.4 table: per-task peak multipliers P_k / lr0 for T_s = 1420 (W = C = 142).
PEAKS = {  # k: (cosine meta, rsqrt autoregressive, rsqrt continued, recovered warmup peak)
    0: (1.0000, 1.0000, 1.0000, 1.0000),
    1: (0.4999, 0.4270, 0.3340, 0.2507),
    2: (0.2504, 0.3786, 0.2433, 0.1776),
    3: (0.1471, 0.3599, 0.2008, 0.1452),
    4: (0.0963, 0.3499, 0.1749, 0.1259),
    5: (0.0678, 0.3437, 0.1570, 0.1127),
    6: (0.0504, 0.3394, 0.1437, 0.1030),
    7: (0.0390, 0.3363, 0.1333, 0.0954),
    8: (0.0311, 0.3340, 0.1249, 0.0893),
    9: (0.0254, 0.3322, 0.1179, 0.0842),
    10: (0.0212, 0.3307, 0.1120, 0.0800),
    14: (0.0119, 0.3268, 0.0950, 0.0677),
    19: (0.0071, 0.3243, 0.0818, 0.0583),
}


# The table has 4 decimals; k = 9's recovered peak is exactly 0.08425 (= 0.001 + 0.999/12).
HALF = 5.0001e-5


@pytest.mark.parametrize("k", sorted(PEAKS))
def test_meta_schedule_peaks_match_the_spec_table(k):
    cosine, autoregressive, continued, recovered = PEAKS[k]
    w = 142
    peak = lambda name, **p: make(name, **p)(k, w - 1) / LR0  # noqa: E731
    assert peak("warmup_cosine_meta") == pytest.approx(cosine, abs=HALF)
    assert peak("warmup_cosine_dynamic") == pytest.approx(cosine, abs=HALF)
    assert peak("rsqrt_meta") == pytest.approx(autoregressive, abs=HALF)
    assert peak("rsqrt_meta", meta_mode="continued") == pytest.approx(continued, abs=HALF)
    compat = make("rsqrt_meta", meta_mode="recovered", recovered_compat=True)
    fixed = make("rsqrt_meta", meta_mode="recovered")
    assert compat(k, w - 1) / LR0 == pytest.approx(recovered, abs=HALF)
    # After warmup the recovered schedule continues one rsqrt: its value at s = W is the
    # continued column; the [FIX] warms up to exactly that value (no jump).
    assert compat(k, w) / LR0 == pytest.approx(continued, abs=HALF)
    assert fixed(k, w - 1) == pytest.approx(fixed(k, w), rel=1e-12)


def test_meta_cosine_within_task_and_dynamic_tail():
    w, e = 142, TS - 142
    v1 = 0.5 * (1 + math.cos(math.pi * (e + 1) / (2 * e)))
    p1 = LR_MIN + v1 * (LR0 - LR_MIN)
    meta = make("warmup_cosine_meta")
    np.testing.assert_allclose(meta(1, 0), p1 / w, rtol=1e-12)
    np.testing.assert_allclose(meta(1, TS - 1), LR_MIN, rtol=1e-12)
    dynamic = make("warmup_cosine_dynamic")
    # task 1, step s: the warmup-cosine over 2 * T_s steps (W' = 284) at global step T_s + s
    for s in (w, 700, TS - 1):
        g, wg = TS + s, 284
        expected = LR_MIN + 0.5 * (1 + np.cos(np.pi * (g - wg + 1) / (2 * TS - wg))) * (
            LR0 - LR_MIN
        )
        np.testing.assert_allclose(dynamic(1, s), expected, rtol=1e-12)
    np.testing.assert_allclose(dynamic(1, w), p1, rtol=1e-4)  # meets P_1 at the warmup end


def test_wsd_shapes():
    lin, sq = make("wsd"), make("wsd", decay_shape="1-sqrt")
    assert lin(0, 142) == LR0 and lin(0, TS - 143) == LR0  # stable phase
    np.testing.assert_allclose(lin(0, TS - 1), LR_MIN, rtol=1e-12)
    np.testing.assert_allclose(lin(0, TS - 71), LR_MIN + (1 - 72 / 142) * (LR0 - LR_MIN))
    np.testing.assert_allclose(sq(0, TS - 71), LR_MIN + (1 - np.sqrt(72 / 142)) * (LR0 - LR_MIN))


def test_bad_requests():
    with pytest.raises(ValueError, match="unknown schedule"):
        make("triangle")
    with pytest.raises(ValueError, match="does not take"):
        make("constant", warmup_fraction=0.2)  # a flag that would do nothing
    with pytest.raises(ValueError, match="does not take"):
        make("multistep", min_lr_multiplier=0.1)
    with pytest.raises(ValueError, match="meta_mode"):
        make("rsqrt_meta", meta_mode="sideways")
    with pytest.raises(ValueError, match="outside"):
        make("warmup_cosine")(T, 0)
    with pytest.raises(ValueError, match="outside"):
        make("warmup_cosine")(0, TS)
    with pytest.raises(ValueError, match="warmup"):
        make("warmup_cosine", steps=10, warmup_steps=10)


def test_values_are_python_floats():
    for name in ("constant", "cosine", "warmup_cosine", "warmup_cosine_meta", "rsqrt", "wsd"):
        assert type(make(name)(2, 100)) is float


ALL = schedules.NAMES


def test_one_compiled_step_serves_every_schedule_and_task(tiny_model):
    """The rate is a host float fed to the step: no schedule or task boundary retraces it."""
    from fomo_jax import params as params_lib
    from fomo_jax import sharding
    from fomo_jax.continual.loop import finetuning
    from fomo_jax.train import optimizer

    graphdef, params = params_lib.split(tiny_model)
    tx, mesh = optimizer.adamw(), sharding.make_mesh()
    step, state = finetuning(graphdef, tx, mesh, params)
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8),
        "token_ids": rng.integers(1, 250, (4, 16)).astype(np.int32),
    }
    for name in ALL:
        lr = schedules.make(name, base_lr=1e-3, steps_per_task=20, num_tasks=3)
        for task, s in [(0, 0), (0, 19), (1, 0), (2, 5)]:  # boundaries of tasks
            state, metrics = step(state, batch, lr(task, s))
            assert float(metrics["learning_rate"]) == pytest.approx(lr(task, s), rel=1e-6)
    assert step._cache_size() == 1


def test_plot_command_and_variant_parsing(tmp_path):
    assert schedules.parse_variant("rsqrt_meta:meta_mode=continued;recovered_compat=true") == (
        "rsqrt_meta",
        {"meta_mode": "continued", "recovered_compat": True},
    )
    assert schedules.parse_variant("wsd:decay_fraction=0.2") == ("wsd", {"decay_fraction": 0.2})
    out = tmp_path / "lr.png"
    schedules.main(["--names", "warmup_cosine,rsqrt_meta:meta_mode=recovered", "--steps_per_task",
                    "50", "--num_tasks", "3", "--out", str(out)])  # fmt: skip
    assert out.stat().st_size > 5000
    curve = schedules.stream_curve(make("warmup_cosine", steps=50, tasks=3), 50, 3)
    assert len(curve) == 150 and curve[0] == curve[50] == curve[100]  # restarts every task


# ------------------------------------------------------------------------ as_optax

# Per schedule, parameters that put every feature inside a short stream (multistep's
# milestones at steps 20 and 40 of each task; each rsqrt_meta mode).
OPTAX_CASES = [(name, {}) for name in ALL if name != "multistep"] + [
    ("multistep", {"milestones": (640, 1280), "batch_size": 32}),
    ("rsqrt_meta", {"meta_mode": "continued"}),
    ("rsqrt_meta", {"meta_mode": "recovered"}),
    ("rsqrt_meta", {"meta_mode": "recovered", "recovered_compat": True}),
    ("wsd", {"decay_shape": "1-sqrt"}),
]
OPTAX_STEPS, OPTAX_TASKS = 60, 4


@pytest.mark.parametrize("name, params", OPTAX_CASES, ids=lambda x: str(x))
def test_as_optax_equals_make_at_every_step_of_the_stream(name, params):
    import jax
    import jax.numpy as jnp

    lr = make(name, steps=OPTAX_STEPS, tasks=OPTAX_TASKS, **params)
    want = np.array(schedules.stream_curve(lr, OPTAX_STEPS, OPTAX_TASKS))  # float64, host
    assert len(set(want.tolist())) > 1 or name == "constant"  # the stream is not flat
    sched = schedules.as_optax(name, base_lr=LR0, steps_per_task=OPTAX_STEPS,
                               num_tasks=OPTAX_TASKS, **params)  # fmt: skip
    got = np.asarray(jax.jit(jax.vmap(sched))(jnp.arange(len(want))))  # traced counts
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want.astype(np.float32))  # one rounding: exact
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=0)
    # t = task x steps_per_task + step, spot-checked eagerly at the task boundaries
    for task, step in [(0, 0), (1, 0), (1, OPTAX_STEPS - 1), (OPTAX_TASKS - 1, 7)]:
        assert float(sched(task * OPTAX_STEPS + step)) == np.float32(lr(task, step))
    # Before the stream: its first rate; past it: its last (optax holds the end value).
    assert float(sched(-3)) == got[0] and float(sched(len(want) + 5)) == got[-1]
    # A made schedule gives the same table.
    np.testing.assert_array_equal(
        jax.vmap(schedules.as_optax(lr, steps_per_task=OPTAX_STEPS, num_tasks=OPTAX_TASKS))(
            jnp.arange(len(want))
        ),
        got,
    )


def test_as_optax_drives_an_optax_optimizer():
    """As the learning rate of SGD (scale_by_schedule) and of inject_hyperparams, step by step
    over the whole stream inside one jitted scan: update t is -lr(t) x gradient."""
    import jax
    import jax.numpy as jnp
    import optax

    sched = schedules.as_optax("warmup_cosine_meta", base_lr=LR0, steps_per_task=OPTAX_STEPS,
                               num_tasks=OPTAX_TASKS)  # fmt: skip
    lr = make("warmup_cosine_meta", steps=OPTAX_STEPS, tasks=OPTAX_TASKS)
    want = -np.array(schedules.stream_curve(lr, OPTAX_STEPS, OPTAX_TASKS), np.float32)
    for tx in (optax.sgd(sched), optax.inject_hyperparams(optax.sgd)(learning_rate=sched)):

        @jax.jit
        def run(tx=tx):
            params = jnp.zeros(())

            def body(state, _):
                updates, state = tx.update(jnp.ones(()), state, params)
                return state, updates

            return jax.lax.scan(body, tx.init(params), None, length=len(want))[1]

        np.testing.assert_array_equal(np.asarray(run()), want)


def test_as_optax_matches_optax_cosine_restarted_per_task():
    """An independent reference for the global-step indexing: `cosine` is optax's cosine
    decay (alpha = min_lr_multiplier) restarted at every task boundary."""
    import jax
    import jax.numpy as jnp
    import optax

    pieces = [optax.cosine_decay_schedule(LR0, OPTAX_STEPS, alpha=1e-3)] * OPTAX_TASKS
    boundaries = [OPTAX_STEPS * k for k in range(1, OPTAX_TASKS)]
    reference = optax.join_schedules(pieces, boundaries)
    sched = schedules.as_optax("cosine", base_lr=LR0, steps_per_task=OPTAX_STEPS,
                               num_tasks=OPTAX_TASKS)  # fmt: skip
    counts = jnp.arange(OPTAX_STEPS * OPTAX_TASKS)
    # optax evaluates in float32: near lr_min its cosine loses digits to cancellation.
    np.testing.assert_allclose(jax.vmap(sched)(counts), jax.vmap(reference)(counts), rtol=2e-6,
                               atol=1e-6 * LR0)  # fmt: skip


def test_as_optax_bad_requests():
    with pytest.raises(ValueError, match="needs base_lr"):
        schedules.as_optax("cosine", steps_per_task=10, num_tasks=2)
    with pytest.raises(ValueError, match="does not take"):
        schedules.as_optax("constant", base_lr=1.0, steps_per_task=10, num_tasks=2, gamma=0.5)
    with pytest.raises(ValueError, match=r"takes no schedule parameters \['base_lr'\]"):
        schedules.as_optax(make("cosine"), base_lr=1.0, steps_per_task=TS, num_tasks=T)
    with pytest.raises(TypeError, match="schedule name or lr"):
        schedules.as_optax(0.1, steps_per_task=10, num_tasks=2)
