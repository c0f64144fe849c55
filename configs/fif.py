"""`--config=configs/fif.py[:ARG]` from a source checkout: the packaged config `fif`
(fomo_jax/configs/fif.py), which `--config=fif[:ARG]` names from any folder."""

from fomo_jax.configs.fif import get_config  # noqa: F401
