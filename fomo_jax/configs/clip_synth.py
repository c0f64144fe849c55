"""Default job: pretrain a small CLIP from scratch on fif_synth's pool (generated, no downloads).

fomo-jax run --config=clip_synth               # this config
fomo-jax run --config=clip_synth:smoke         # 6 steps, for checks
fomo-jax run --config=clip_synth --config.steps=1000 --config.mesh.fsdp=2
"""

from ml_collections import config_dict


def get_config(arg: str | None = None):
    c = config_dict.ConfigDict()
    c.seed = 0
    c.steps = 2000  # θ0 close to converged, so replay alone cannot improve it (benchmarks/)
    c.batch_size = 128
    c.log_every = 50
    c.checkpoint_every = 500  # steps; a killed job resumes from its last checkpoint

    c.model = config_dict.ConfigDict()
    c.model.name = "tiny"  # see fomo_jax.models.VARIANTS
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    c.model.attention_implementation = config_dict.placeholder(str)  # None: choose per platform
    c.model.context_length = 48  # fif_synth captions fit in 48 byte tokens; None: the variant's
    c.model.remat = "none"  # or "full", "save_matmuls": recompute blocks in the backward pass
    c.model.scan = False  # True: scan over the blocks (compile time flat in depth)

    c.data = config_dict.ConfigDict()  # fif_synth, generated once under `root`
    c.data.root = "runs/fif_synth_data"
    c.data.seed = 0
    c.data.image_size = 40
    c.data.train_per_class = 80
    c.data.test_per_class = 20
    c.data.pool_size = 20_000
    c.data.samples_per_shard = 2_500
    c.data.num_threads = 0  # decode in the calling thread: for 40-px images 5.4k samples/s vs
    # 3.0k with 2 threads (grain per-element overhead), measured on the pipeline alone

    c.optimizer = config_dict.ConfigDict()
    c.optimizer.lr = 2e-3
    c.optimizer.warmup_fraction = 0.1
    c.optimizer.min_lr_multiplier = 1e-3
    c.optimizer.weight_decay = 0.2
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 1.0
    c.optimizer.decay_convention = "all"  # or "openclip": no decay on gains, biases, scale

    c.mesh = config_dict.ConfigDict()
    c.mesh.data = -1  # all remaining devices
    c.mesh.fsdp = 1
    c.mesh.model = 1
    c.mesh.fsdp_transpose = 1  # a second FSDP axis, for widths fsdp alone cannot split
    c.mesh.dcn_data = -1  # granules (TPU slices / processes) the data axis spans (make_mesh)

    if arg == "smoke":
        c.steps = 6
        c.log_every = 3
        c.checkpoint_every = 2
        c.batch_size = 16
        c.data.root = "runs/fif_synth_smoke_data"
        c.data.train_per_class = 4
        c.data.test_per_class = 2
        c.data.pool_size = 400
        c.data.samples_per_shard = 200
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected nothing or 'smoke'")
    return c
