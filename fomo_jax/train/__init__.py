"""The one train state and jitted step of every job, the optimizer, the CLIP loss, and the
pretraining job (`pretrain`)."""
