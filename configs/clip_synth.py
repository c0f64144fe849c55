"""`--config=configs/clip_synth.py[:ARG]` from a source checkout: the packaged config `clip_synth`
(fomo_jax/configs/clip_synth.py), which `--config=clip_synth[:ARG]` names from any folder."""

from fomo_jax.configs.clip_synth import get_config  # noqa: F401
