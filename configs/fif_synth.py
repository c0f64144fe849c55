"""`--config=configs/fif_synth.py[:ARG]` from a source checkout: the packaged config `fif_synth`
(fomo_jax/configs/fif_synth.py), which `--config=fif_synth[:ARG]` names from any folder."""

from fomo_jax.configs.fif_synth import get_config  # noqa: F401
