"""The FoMo-in-Flux benchmark itself: 20 tasks of random_sequence_1, ViT-B/16, batch 512.

Needs the released data and a pretrained checkpoint on disk (nothing is downloaded; README,
"The real benchmark", says where each comes from):

fomo-jax run --config=fif --workdir=runs/fif_finetune \\
    --config.data.root=/data/fif --config.data.pretraining_pool=/data/laion_shards \\
    --config.theta0.checkpoint=/ckpt/open_clip_vit_b16_laion2b.safetensors \\
    --config.tokenizer=/ckpt/bpe_simple_vocab_16e6.txt.gz

θ0 is the checkpoint: without `config.theta0.checkpoint` the run stops
(`runner.check_theta0`), unless
`--config.theta0.make=True` asks for a θ0 pretrained here from scratch on the pretraining pool
(the `config.theta0` recipe; for a ViT-B/16 that is a pretraining job of its own, not a
stand-in for the released weights). Steps per task come from the paper's compute budget
(Table 4: 1420 for fine-tuning at T = 20).
"""

from ml_collections import config_dict

from fomo_jax.configs import fif_synth


def get_config(arg: str | None = None):
    c = fif_synth.get_config()
    c.num_tasks = 20
    c.batch_size = 512
    c.steps_per_task = config_dict.placeholder(int)  # None: from the budget table
    c.budget = "paper"
    c.log_every = 50
    c.checkpoint_every = 500
    c.model.name = "ViT-B-16"
    c.model.dtype = "bfloat16"
    c.model.context_length = config_dict.placeholder(int)  # None: the model's
    c.data.benchmark = "fif"
    c.data.root = ""  # the released data (<root>/<NAME>/...), required
    c.data.num_threads = 16
    c.data.decode_once = False  # the released images are 224 px and the pool has millions
    c.optimizer.lr = 1e-5
    c.eval.batch_size = 512
    c.tokenizer = ""  # the CLIP BPE vocabulary file, required
    c.theta0.make = False  # True: no checkpoint; pretrain θ0 from scratch on the pool
    if arg:
        raise ValueError(f"unknown config argument {arg!r}")
    return c
