"""fomo_jax command line: `python run.py [--config=configs/X.py[:arg]] [--config.KEY=VALUE ...]`."""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(_HERE, "configs", "fif_synth.py"),
    "Experiment config file.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    os.path.join(_HERE, "runs", "fif_synth"),
    "Where outputs (metrics, plots, model) are written.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from fomo_jax import runtime

    runtime.quiet_checkpoint_logs()
    runtime.enable_compilation_cache()
    config = _CONFIG.value
    if config.get("job", "pretrain") == "continual":  # configs/fif_synth.py, configs/fif.py
        from fomo_jax.continual import runner, workdir

        try:
            runner.run(config, _WORKDIR.value)
        except workdir.Preempted as stop:  # SIGTERM: checkpointed; the same command resumes
            logging.warning("%s; exit status %d", stop, workdir.EXIT_PREEMPTED)
            sys.exit(workdir.EXIT_PREEMPTED)
        return
    from fomo_jax.train import pretrain  # configs/clip_synth.py: pretraining only

    results = pretrain.train(config, _WORKDIR.value)
    logging.info("results (%s/results.json):", _WORKDIR.value)
    for key, value in results.items():
        print(f"  {key:28s} {value:.4g}" if isinstance(value, float) else f"  {key:28s} {value}")


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main)
