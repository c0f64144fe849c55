"""fomo_jax command line: `python run.py [--config=configs/X.py[:arg]] [--config.KEY=VALUE ...]`."""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(_HERE, "configs", "clip_synth.py"),
    "Experiment config file.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    os.path.join(_HERE, "runs", "clip_synth"),
    "Where outputs (metrics, plots, model) are written.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fomo_jax import runtime
    from fomo_jax.train import pretrain

    runtime.enable_compilation_cache()
    results = pretrain.train(_CONFIG.value, _WORKDIR.value)
    logging.info("results (%s/results.json):", _WORKDIR.value)
    for key, value in results.items():
        print(f"  {key:28s} {value:.4g}" if isinstance(value, float) else f"  {key:28s} {value}")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)
