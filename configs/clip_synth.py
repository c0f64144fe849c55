"""Default job: train a small CLIP from scratch on procedural image-text pairs (no downloads).

python run.py                                   # this config
python run.py --config=configs/clip_synth.py:smoke
python run.py --config.steps=1000 --config.model.name=tiny --config.mesh.fsdp=2
"""

from ml_collections import config_dict


def get_config(arg: str | None = None):
    c = config_dict.ConfigDict()
    c.seed = 0
    c.steps = 600
    c.batch_size = 128
    c.log_every = 50

    c.model = config_dict.ConfigDict()
    c.model.name = "tiny"  # see fomo_jax.models.VARIANTS
    c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators
    c.model.attention_implementation = config_dict.placeholder(str)  # None: choose per platform

    c.data = config_dict.ConfigDict()
    c.data.num_train = 20_000
    c.data.num_eval = 400

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

    if arg == "smoke":
        c.steps = 6
        c.log_every = 3
        c.batch_size = 16
        c.data.num_train = 256
        c.data.num_eval = 32
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected nothing or 'smoke'")
    return c
