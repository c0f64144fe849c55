"""`--config=configs/vlm_synth.py[:ARG]` from a source checkout: the packaged config `vlm_synth`
(fomo_jax/configs/vlm_synth.py), which `--config=vlm_synth[:ARG]` names from any folder."""

from fomo_jax.configs.vlm_synth import get_config  # noqa: F401
