"""The README's main command: `python run.py [flags]` is `fomo-jax run [flags]`.

    python run.py                                         # the default experiment (fif_synth)
    python run.py --config=configs/fif_synth.py:smoke     # or --config=fif_synth:smoke
    python run.py --config=configs/clip_synth.py --workdir=runs/clip

Flags, defaults and behaviour are those of `fomo-jax run` (fomo_jax/cli.py); `--help` lists them.
"""

import sys

from fomo_jax import cli

if __name__ == "__main__":
    sys.exit(cli.main([sys.argv[0], "run", *sys.argv[1:]]))
