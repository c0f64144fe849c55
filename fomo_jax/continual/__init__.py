"""The one training loop (`loop`) and what runs through it: the continual runner (`runner`),
θ0 making (`theta0`), the methods (`methods/`), checkpoints, logging, evaluation jobs and
sweeps (spec §7-8, §10-11)."""
