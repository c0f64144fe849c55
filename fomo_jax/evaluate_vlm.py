"""Evaluation of a VLM on the synthetic world (`data.vlm_synth`), with fixed prompts.

Per kind of evaluation item (`per_dataset[kind]["accuracy"]`, in %):
- VQA types (`colour`, `shape`, `position`, `count`, `new_shapes`, `reading`, `knowledge`):
  exact match of the answer and its ⟨eou⟩, computed teacher-forced (one forward: every answer
  token and the terminator is the argmax after the gold prefix), which equals greedy decoding's
  exact match (a greedy continuation equals the answer iff each of its tokens is the argmax
  after the previous ones); `greedy_answers` decodes for checking that.
- `caption`: slot F1 of greedily decoded scene descriptions (`vlm_synth.slot_f1`).
- `facts` (held-out facts, text only): multiple choice over the relation's four values by option
  log-likelihood (`facts`, chance 25%) and cloze, the argmax over the whole vocabulary
  (`facts_cloze`).
- `binding`: k-shot nonce binding, a choice between the episode's two nonce words by
  log-likelihood, reported per k (`binding_k{k}`, chance 50%).

Summary (the run's `metric_keys`): `knowledge_accumulation` (A_KA): the mean over the stream's
skills (all of them at every evaluation point, correction 5); `zero_shot_retention` (A_ZS):
the mean over θ0's evaluation-only skills (those of `RETENTION_KINDS` evaluated);
`geometric_mean`; and
`text_retention`: the mean of the held-out facts' multiple choice and cloze.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fomo_jax import params as params_lib
from fomo_jax.data import vlm_batches as vb
from fomo_jax.data import vlm_synth
from fomo_jax.models import generate

METRIC_KEYS = ("knowledge_accumulation", "zero_shot_retention", "geometric_mean",
               "text_retention")  # fmt: skip
RETENTION_KINDS = ("colour", "shape", "position", "caption")


def pixels(images) -> jax.Array:
    from fomo_jax.families.vlm import pixels as family_pixels

    return family_pixels(images)


def _rows(items, answers: bool) -> list[vb.Example]:
    """Examples of `items`: the prompt, and with `answers` the answer as the target (with ⟨eou⟩
    after conversation answers)."""
    out = []
    for item in items:
        segments = item.segments
        if answers:
            segments += (vb.Text(item.answer, True),)
            if item.kind in vlm_synth.VQA_KINDS or item.kind == "caption":
                segments += (vb.EOU_TARGET,)
        out.append(vb.Example(segments, item.kind))
    return out


class Evaluator:
    """The evaluation of one world; `items`: {kind: count} of its evaluation items; `skills`:
    the stream's kinds (A_KA). A subset evaluation uses the first half of every kind's items."""

    def __init__(self, world: vlm_synth.World, tokenizer, model_config, *, items: dict,
                 skills, batch_size: int, max_new_tokens: int = 40):  # fmt: skip
        unknown = set(items) - set(vlm_synth.EVAL_KINDS)
        if unknown:
            raise ValueError(f"config.eval.kinds: unknown kinds {sorted(unknown)}; expected "
                             f"{vlm_synth.EVAL_KINDS}")  # fmt: skip
        given = {k for k, n in items.items() if n > 0}
        missing = {*skills, "facts"} - given
        if missing or not given & set(RETENTION_KINDS):
            raise ValueError(f"config.eval.kinds needs items of {sorted(missing)} and of at "
                             f"least one of {RETENTION_KINDS}")  # fmt: skip
        self.world, self.tokenizer, self.config = world, tokenizer, model_config
        self.skills, self.batch_size = tuple(skills), batch_size
        self.max_new_tokens = max_new_tokens
        self.items = {kind: world.eval_items(kind, int(n)) for kind, n in items.items() if n}
        self.seq = model_config.image_seq_length
        self.size = model_config.vision.vision.image_size
        # One batch shape per group (VQA and captions; facts; binding): fewer compilations.
        groups = {kind: "facts" if kind == "facts" else "binding" if kind == "binding" else "vqa"
                  for kind in self.items}  # fmt: skip
        shapes = {g: self._shape([k for k in self.items if groups[k] == g])
                  for g in set(groups.values())}  # fmt: skip
        self._shapes = {kind: shapes[groups[kind]] for kind in self.items}

    def _shape(self, kinds) -> tuple[int, int]:
        """(length, images) every batch of `kinds` is padded to (the same for subsets)."""
        rows = [r for kind in kinds for r in _rows(self.items[kind], answers=True)]
        stats = [vb._tokens(r, self.tokenizer.encode, vlm_synth.SPECIALS, self.seq) for r in rows]
        length = max(len(ids) for ids, _, _ in stats)
        return -(-length // 8) * 8, max(len(images) for _, _, images in stats)

    def collate(self, kind, items, answers=True) -> dict:
        length, images = self._shapes[kind]
        return vb.collate(_rows(items, answers), self.tokenizer.encode, vlm_synth.SPECIALS,
                          self.seq, length, images, self.size)  # fmt: skip

    def _batched(self, kind, items, graphdef, params):
        """exact [n] and first-target logits [n, V] of `items`, in batches of `batch_size`."""
        exact, first = [], []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # one shape
            e, f = _scores(graphdef, params, self.collate(kind, padded))
            exact.append(np.asarray(e)[: len(chunk)])
            first.append(np.asarray(f)[: len(chunk)])
        return np.concatenate(exact), np.concatenate(first)

    def greedy_answers(self, graphdef, params, kind, items) -> list[str]:
        """Greedy continuations of the prompts of `items` (left-padded), decoded, up to and with
        ⟨eou⟩ when it came within `max_new_tokens` ("red <eou>")."""
        model = params_lib.merge(graphdef, params)
        rows = _rows(items, answers=False)
        lengths = [len(vb._tokens(r, self.tokenizer.encode, vlm_synth.SPECIALS, self.seq)[0])
                   for r in rows]  # fmt: skip
        out = []
        for start in range(0, len(items), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            chunk = chunk + [chunk[-1]] * (self.batch_size - len(chunk))  # one shape
            batch = vb.collate(chunk, self.tokenizer.encode, vlm_synth.SPECIALS, self.seq,
                               max(lengths), self._shapes[kind][1], self.size)  # fmt: skip
            tokens, mask = batch["tokens"], batch["attention_mask"]
            for row in range(len(chunk)):  # right padding -> left padding
                shift = len(mask[row]) - int(mask[row].sum())
                tokens[row], mask[row] = np.roll(tokens[row], shift), np.roll(mask[row], shift)
            images = pixels(batch["images"]) if batch["images"].shape[1] else None
            result = generate.greedy_generate(
                model, tokens, mask, max_new_tokens=self.max_new_tokens,
                stop_tokens=vlm_synth.SPECIALS.eou, pad_id=vlm_synth.SPECIALS.pad,
                images=images, image_valid=batch["image_valid"],
            )  # fmt: skip
            generated, counts = np.asarray(result.tokens), np.asarray(result.lengths)
            for row in range(min(self.batch_size, len(items) - start)):
                out.append(self.tokenizer.decode(generated[row, : counts[row]]))
        return out

    # ---- the evaluation ----------------------------------------------------------------------
    def evaluate(self, graphdef, params, *, subset: bool) -> dict:
        params = jax.device_get(params)  # host arrays: one compilation whatever their placement
        per_dataset = {}
        for kind, items in self.items.items():
            if subset:
                items = items[: max(1, len(items) // 2)]
            if kind == "caption":
                predictions = self.greedy_answers(graphdef, params, kind, items)
                pairs = zip(predictions, items, strict=True)
                scores = [vlm_synth.slot_f1(p, i.answer) for p, i in pairs]
                per_dataset[kind] = {"accuracy": 100 * float(np.mean(scores)), "n": len(items)}
                continue
            exact, first = self._batched(kind, items, graphdef, params)
            if kind in vlm_synth.VQA_KINDS:
                per_dataset[kind] = {"accuracy": 100 * float(exact.mean()), "n": len(items)}
            elif kind == "facts":
                mc, cloze = multiple_choice(first, items, self.tokenizer)
                per_dataset["facts"] = {"accuracy": 100 * float(mc.mean()), "n": len(items)}
                per_dataset["facts_cloze"] = {"accuracy": 100 * float(cloze.mean()),
                                              "n": len(items)}  # fmt: skip
            else:  # binding, per number of demonstrations
                mc, _ = multiple_choice(first, items, self.tokenizer)
                shots = np.array([i.shots for i in items])
                for k in sorted(set(shots)):
                    per_dataset[f"binding_k{k}"] = {"accuracy": 100 * float(mc[shots == k].mean()),
                                                    "n": int((shots == k).sum())}  # fmt: skip
        return dict(summary(per_dataset, self.skills), per_dataset=per_dataset)

    def subset_manifest(self) -> dict:
        return {kind: max(1, len(items) // 2) for kind, items in self.items.items()}


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef, params, batch):
    """(exact [B]: every supervised target is the argmax, first [B, V]: the logits that predict
    the first target), compiled once per model structure and batch shape (shared by runs)."""
    model = params_lib.merge(graphdef, params)
    images = None if batch["images"].shape[1] == 0 else pixels(batch["images"])
    prefix = batch["prefix_length"] if model.config.fusion == "prefix" else None
    logits = model(batch["tokens"], images, image_valid=batch["image_valid"],
                   attention_mask=batch["attention_mask"], prefix_length=prefix)  # fmt: skip
    predicted = jnp.argmax(logits[:, :-1], axis=-1)
    mask = batch["loss_mask"][:, :-1]
    exact = jnp.all((predicted == batch["tokens"][:, 1:]) | ~mask, axis=1)
    first = jnp.argmax(batch["loss_mask"], axis=1)
    return exact, jnp.take_along_axis(logits, first[:, None, None], axis=1)[:, 0]


def multiple_choice(first_logits, items, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(option log-likelihood choice correct, cloze correct) per item; each option is one
    token, so its log-likelihood ranks as its logit at the first answer position."""
    mc, cloze = [], []
    for logits, item in zip(np.asarray(first_logits), items, strict=True):
        (answer,) = tokenizer.encode(item.answer)
        options = [tokenizer.encode(o)[0] for o in item.options]
        mc.append(options[int(np.argmax(logits[options]))] == answer)
        cloze.append(int(np.argmax(logits)) == answer)
    return np.array(mc), np.array(cloze)


def summary(per_dataset: dict, skills) -> dict:
    """The run's headline metrics from the per-kind accuracies (see the module docstring)."""
    ka = float(np.mean([per_dataset[s]["accuracy"] for s in skills])) if skills else 0.0
    zs = float(np.mean([per_dataset[k]["accuracy"] for k in RETENTION_KINDS if k in per_dataset]))
    text = float(np.mean([per_dataset["facts"]["accuracy"],
                          per_dataset["facts_cloze"]["accuracy"]]))  # fmt: skip
    return dict(
        knowledge_accumulation=ka,
        zero_shot_retention=zs,
        geometric_mean=float(np.sqrt(max(ka, 0.0) * max(zs, 0.0))),
        text_retention=text,
    )
