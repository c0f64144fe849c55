"""Default experiment: continual pretraining on fif_synth (generated; no downloads).

θ0 is a tiny CLIP pretrained on fif_synth's pool (made once, cached next to the data); then
plain fine-tuning over the stream's tasks with the benchmark's batch mixture, evaluated after
every task. Runs on 2 CPU cores.

fomo-jax run                                           # this config (or: python run.py)
fomo-jax run --config=fif_synth:smoke                  # the same loop, tiny and fast (tests)
fomo-jax run --config=fif_synth:study                  # 20 tasks of 30 steps (fif_findings)
fomo-jax run --config.schedule.name=rsqrt --workdir=runs/rsqrt
"""

from ml_collections import config_dict

from fomo_jax.continual import methods


def get_config(arg: str | None = None):
    c = config_dict.ConfigDict()
    c.job = "continual"
    c.family = "clip"  # the model family (fomo_jax.families): model, loss, evaluator, export
    c.seed = 0
    c.method = "finetune"
    c.methods = methods.default_configs()  # every method's hyperparameters (spec §8)
    c.num_tasks = 4
    c.batch_size = 128
    c.steps_per_task = 150  # None: n_samples // batch_size, else the budget table
    c.n_samples = config_dict.placeholder(int)
    c.budget = "paper"  # or "measured" (spec §5.3)
    # True: steps_per_task (or n_samples) is full fine-tuning's, and a method gets it x
    # MAF_finetune / MAF_method (MAFs from `budget`): methods compare at equal compute.
    c.equal_compute = False
    c.log_every = 50
    c.checkpoint_every = 100  # steps; checkpoints are also written after every task

    c.mixture = config_dict.ConfigDict({"pretraining": 0.33, "update": 0.34, "buffer": 0.33})

    c.model = config_dict.ConfigDict()
    c.model.name = "tiny"
    c.model.dtype = "float32"
    c.model.attention_implementation = config_dict.placeholder(str)
    c.model.context_length = 48
    c.model.remat = "none"  # or "full", "save_matmuls": recompute blocks in the backward pass
    c.model.scan = False  # True: scan over the blocks (compile time flat in depth)
    c.tokenizer = "bytes"  # or a CLIP BPE file / HF tokenizer folder (fomo_jax.tokenizer)
    # The contrastive loss (CLIP family; fomo_jax.train.losses): "clip" (dense softmax),
    # "clip_chunked" (the same, O(B/N x chunk) memory per device), "siglip" (sigmoid, with a
    # learnable logit bias), "siglip_chunked".
    c.loss = "clip"
    c.loss_chunk_size = 1024  # texts per block of the chunked losses (memory O(B/N x chunk))

    c.data = config_dict.ConfigDict()
    c.data.benchmark = "fif_synth"  # or "fif" (the released data under data.root)
    c.data.root = "runs/fif_synth_data"
    c.data.info_dir = config_dict.placeholder(str)  # default <root>/00_info
    c.data.stream = config_dict.placeholder(str)  # default <root>/streams/random_sequence_1.json
    c.data.pretraining_pool = config_dict.placeholder(str)  # default <root>/pretraining
    c.data.num_threads = 0
    # Decode every training image once into memory (fif_synth's 40-px images: ~105 MiB) rather
    # than per sample; the batches are the same (pipeline.DecodedSource).
    c.data.decode_once = True
    # An undecodable training image: "error" stops the run naming the file and the split;
    # "skip" replaces the sample by a deterministic draw from the same pool (resume stays
    # exact), counts it in results.json, and stops the run past this fraction of its samples.
    c.data.bad_images = "error"
    c.data.max_bad_image_fraction = 0.001
    c.data.synth_seed = 0
    c.data.image_size = 40
    c.data.train_per_class = 80
    c.data.test_per_class = 20
    c.data.pool_size = 20_000
    c.data.samples_per_shard = 2_500

    c.theta0 = config_dict.ConfigDict()
    c.theta0.checkpoint = config_dict.placeholder(str)  # a pretrained model instead of making one
    c.theta0.cache_dir = config_dict.placeholder(str)  # default: the data root
    c.theta0.steps = 800
    c.theta0.batch_size = 128
    c.theta0.lr = 2e-3
    c.theta0.weight_decay = 0.2

    c.optimizer = config_dict.ConfigDict()
    c.optimizer.lr = 2e-3
    c.optimizer.weight_decay = 0.2
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.clip_norm = 1.0
    c.optimizer.decay_convention = "all"
    c.optimizer.carry_state = False  # True: keep AdamW moments across tasks
    # {group: factor}: a parameter group's learning rate x factor (groups: the family's).
    c.optimizer.lr_multipliers = config_dict.ConfigDict()
    # How each parameter trains, replacing the method's own choice: ordered (regex, label)
    # rules over parameter paths, the first match wins, unmatched paths are frozen; labels
    # "frozen", "full", "lora" (an adapter on a linear's kernel; adapter methods only).
    c.trainable = config_dict.placeholder(tuple)

    # One flag picks the schedule; unset parameters take the spec's defaults (fomo_jax.schedules),
    # and a parameter the chosen schedule does not use is an error.
    c.schedule = config_dict.ConfigDict()
    c.schedule.name = "warmup_cosine"
    for key, kind in [("warmup_fraction", float), ("warmup_steps", int),
                      ("cooldown_fraction", float), ("min_lr_multiplier", float),
                      ("meta_mode", str), ("recovered_compat", bool), ("decay_fraction", float),
                      ("decay_shape", str), ("gamma", float)]:  # fmt: skip
        c.schedule[key] = config_dict.placeholder(kind)
    c.schedule.milestones = config_dict.placeholder(tuple)  # multistep, in samples

    c.eval = config_dict.ConfigDict({"batch_size": 256, "every_nth_task": 1})
    # Decoded test images live on disk there (default <workdir>/eval_images), read a batch at a
    # time; a folder several runs share (on storage all hosts see) decodes each set once.
    c.eval.cache_dir = config_dict.placeholder(str)

    # dcn_data: granules (TPU slices, or processes) the data axis spans, fsdp and model laid
    # out inside each; -1: the TPU slices when several, else one (sharding.make_mesh).
    # fsdp_transpose: a second FSDP axis, for widths fsdp alone cannot split (ViT-bigG-14 on
    # 256 devices: fsdp=128 x fsdp_transpose=2).
    c.mesh = config_dict.ConfigDict({"data": -1, "fsdp": 1, "model": 1, "dcn_data": -1,
                                     "fsdp_transpose": 1})  # fmt: skip
    # A checkpoint written on another mesh (other processes or devices) is refused unless set:
    # resuming there is the same computation up to the order of reductions, not bitwise.
    c.resume_on_new_mesh = False

    c.wandb = config_dict.ConfigDict({"enabled": False, "project": "fomo_jax"})
    c.wandb.name = config_dict.placeholder(str)  # default: the work directory's name

    if arg == "smoke":
        c.num_tasks = 2
        c.batch_size = 16
        c.steps_per_task = 6
        c.log_every = 3
        c.checkpoint_every = 2
        c.data.root = "runs/fif_synth_smoke_data"
        c.data.train_per_class = 4
        c.data.test_per_class = 2
        c.data.pool_size = 400
        c.data.samples_per_shard = 200
        c.theta0.steps = 10
        c.theta0.batch_size = 16
        c.eval.batch_size = 64
    elif arg == "study":  # the paper's horizon at 2-core size (benchmarks/fif_findings.py)
        # The stream's 31 classes in 20 tasks of 1-2 classes; the default's θ0 (same data and
        # recipe, so the same cache) and its total stream compute (20 x 30 = 4 x 150 steps).
        c.num_tasks = 20
        c.steps_per_task = 30
        c.log_every = 10
        c.checkpoint_every = 0  # checkpoints after every task only
        c.eval.every_nth_task = 4  # 5 points on the evaluation subsets, then the full sets
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected nothing, 'smoke' or 'study'")
    return c
