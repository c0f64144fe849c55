"""The continual VLM stream on the synthetic vision-language world (no downloads).

θ0 is a small VLM made once by the staged recipe and cached under `data.root`: an LM pretrained
on the world's text, a CLIP trained on the world's pairs (its image tower becomes the VLM's), the
connector aligned on pairs, a short VL pretraining and SFT (`data.vlm_stream`). Then the runner
updates it over a stream of new skills (counting, new shapes, reading signs, naming pictured
creatures), each task mixing its skill's data with a buffer of earlier skills and a pretraining
pool of VL and text-only data, and reports A_KA, A_ZS, their geometric mean and text retention
(held-out facts only LM pretraining saw). Every method, merge and schedule flag works as for CLIP.

fomo-jax run --config=vlm_synth --workdir=runs/vlm
fomo-jax run --config=vlm_synth:smoke --workdir=runs/vlm_smoke   # the same stages, tiny
fomo-jax run --config=vlm_synth --config.method=ema_merge --workdir=runs/vlm_ema
"""

from ml_collections import config_dict

from fomo_jax.configs import fif_synth
from fomo_jax.data import vlm_synth

SKILLS = ("count", "new_shapes", "reading", "knowledge")


def get_config(arg: str | None = None):
    c = fif_synth.get_config()  # the runner's keys (methods, optimizer, schedule, mesh, ...)
    c.family = "vlm"
    c.tokenizer = "words"  # the world's closed word-level vocabulary
    c.num_tasks = len(SKILLS)
    c.batch_size = 32
    c.steps_per_task = 100
    c.budget = "measured"  # the paper's Table 4 is CLIP's
    c.log_every = 25
    c.checkpoint_every = 50
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.05

    c.model = config_dict.ConfigDict()
    c.model.name = "vlm_synth"  # what the start-up budget table calls the model
    c.model.remat = "none"  # memory levers of the image tower and the LM (fomo_jax.models.stack)
    c.model.scan = False
    c.model.vlm = config_dict.ConfigDict(dict(
        vision="tiny",  # CLIP's tiny image tower: 32 px, patches of 8 -> 16 visual tokens
        lm=dict(vocab_size=len(vlm_synth.VOCAB), hidden_size=128, intermediate_size=256,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                max_position_embeddings=512),
        image_token_id=vlm_synth.SPECIALS.image,
        vision_feature_layer=-1,
        connector="mlp2x_gelu",
        fusion="interleave",
    ))  # fmt: skip

    c.data = config_dict.ConfigDict()
    c.data.benchmark = "vlm_synth"
    c.data.root = "runs/vlm_synth_data"  # the world's description and θ0's stage caches
    c.data.synth_seed = 0
    c.data.skills = SKILLS  # task k trains skill k
    c.data.unit = "examples"  # or "supervised_tokens": what mixture weights are shares of
    c.data.max_length = config_dict.ConfigDict(dict(
        lm_text=80, lm_text_open=80, pairs=32, documents=256, docs_pairs=32, reordered=256,
        vqa=64, text_instr=48, count=40, new_shapes=40, reading=40, knowledge=40,
    ))  # fmt: skip
    # The stream's pretraining pool: θ0's VL data and text-only data (LM text without the
    # held-out facts: text retention measures what the LM keeps, not their replay).
    c.data.pretraining_pool = config_dict.ConfigDict(dict(pairs=0.25, vqa=0.45, text_instr=0.15,
                                                          lm_text_open=0.15))  # fmt: skip
    c.data.num_threads = 0
    c.data.bad_images = "error"  # (generated pictures are never bad)
    c.data.max_bad_image_fraction = 0.0

    c.theta0 = config_dict.ConfigDict()
    c.theta0.checkpoint = config_dict.placeholder(str)
    c.theta0.cache_dir = config_dict.placeholder(str)  # default: the data root
    c.theta0.batch_size = 32
    c.theta0.weight_decay = 0.05
    c.theta0.stages = config_dict.ConfigDict(dict(
        lm=dict(steps=600, lr=3e-3, sources=dict(lm_text=1.0)),
        clip=dict(steps=300, lr=2e-3),  # the CLIP family on the world's pairs
        connector=dict(steps=100, lr=3e-3, sources=dict(pairs=1.0)),
        vl=dict(steps=300, lr=1e-3, sources=dict(pairs=0.4, documents=0.3, lm_text_open=0.3)),
        sft=dict(steps=300, lr=1e-3, sources=dict(vqa=0.7, text_instr=0.3)),
    ))  # fmt: skip
    # What a stage (not `clip`) trains, for the recipe's arms: `trainable`, ordered (regex,
    # label) rules as config.trainable (None: the stage's own, `vlm_stream.TRAINABLE`), and
    # `method` with its `method_options` (e.g. "lora" with the rules labelling "lm/.*" "lora":
    # adapters on the LM, folded into the weights at the stage's end).
    for stage in ("lm", "connector", "vl", "sft"):
        c.theta0.stages[stage].trainable = config_dict.placeholder(tuple)
        c.theta0.stages[stage].method = "finetune"
        c.theta0.stages[stage].method_options = config_dict.ConfigDict()

    c.eval = config_dict.ConfigDict(dict(batch_size=32, every_nth_task=1))
    c.eval.kinds = config_dict.ConfigDict(dict(
        colour=48, shape=48, position=48, count=48, new_shapes=48, reading=48, knowledge=48,
        caption=32, facts=24, binding=64,
    ))  # fmt: skip
    c.eval.cache_dir = config_dict.placeholder(str)

    if arg == "smoke":
        c.num_tasks = 2
        c.data.skills = ("count", "reading")
        c.batch_size = 8
        c.steps_per_task = 4
        c.log_every = 2
        c.checkpoint_every = 2
        c.data.root = "runs/vlm_synth_smoke_data"
        c.theta0.batch_size = 8
        for stage, steps in dict(lm=12, clip=8, connector=4, vl=6, sft=8).items():
            c.theta0.stages[stage].steps = steps
        c.eval.batch_size = 8
        c.eval.kinds = config_dict.ConfigDict(dict(
            colour=8, shape=8, position=8, count=8, reading=8, caption=4, facts=8, binding=8,
        ))  # fmt: skip
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; expected nothing or 'smoke'")
    return c
