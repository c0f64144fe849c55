#!/usr/bin/env bash
# The GPU campaign: every GPU number of the benchmarks in one short run (under 5 minutes on one
# H200), each section's JSON and table written to the output folder as soon as it finishes,
# so a run cut short keeps what it measured. A section that fails is logged and the next runs.
#
#   bash benchmarks/gpu_campaign.sh --wheels            # here, with pip: fetch what the device lacks
#   bash benchmarks/gpu_campaign.sh --out DIR           # on the GPU machine (PYTHONPATH=repo)
#   bash benchmarks/gpu_campaign.sh --dry-run --out DIR # anywhere: every section, tiny shapes, CPU
#
# Sections (benchmarks/README.md describes each script):
#   clip_step      CLIP ViT-B/16 bf16 train step at batch 256 and 512: samples/s, XLA FLOPs, MFU
#                  against the datasheet peak, compiled memory
#   clip_attention the same step at batch 256 under each attention backend (pallas, cudnn, xla)
#   attention      the attention kernels alone (ViT-B/16, text and long-sequence shapes)
#   data           the input pipeline's images/s on this host (ArrayRecord shards, 224-px JPEGs)
#   vlm_step       the VLM train step (small LM, 16 x 1024 tokens) per connector
#   open_clip      fomo_jax's and open_clip's train step on the same GPU, batch and weights
#                  (open_clip with bf16 autocast, fomo_jax with bf16 compute)
# Last, campaign.md gathers every section's table.
#
# The device image has JAX 0.11 with CUDA, flax, optax, orbax, torch and torchvision, but not
# grain (and its portpicker), array_record, ml_collections, ftfy, tensorboardX or open_clip:
# `--wheels` downloads them for CPython 3.12 into .whl/ (git-ignored; the device tool carries
# it), and the campaign installs them into /tmp/site when .whl/ exists. fomo_jax itself runs from the checkout
# (PYTHONPATH), not installed: its pins name JAX 0.10, the image holds 0.11.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=benchmarks/results/gpu
DRY=0
WHEELS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "unknown argument $1 (expected --dry-run, --wheels, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$WHEELS" = 1 ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl
  for spec in grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0 ftfy==6.3.1 wcwidth \
      tensorboardX==2.6.4 open_clip_torch==3.3.0 portpicker==1.6.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec" \
      || echo "could not download $spec" >&2
  done
  ls .whl
  exit 0
fi

# The wheels are CPython 3.12's (the device image's Python); elsewhere the environment's own
# packages serve (a dry run on a dev machine).
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1 \
    && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/campaign.log"
: > "$LOG"
python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import jax, platform
print("jax", jax.__version__, "devices", jax.devices(), "python", platform.python_version())
EOF

FAILED=()
section() {  # section NAME COMMAND...: run it, time it, keep going when it fails
  local name="$1"; shift
  echo "=== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  if "$@" 2>&1 | tee -a "$LOG"; then
    echo "=== $name: done in $((SECONDS - start)) s" | tee -a "$LOG"
  else
    echo "=== $name: FAILED after $((SECONDS - start)) s" | tee -a "$LOG"
    FAILED+=("$name")
  fi
}

if [ "$DRY" = 1 ]; then  # the same sections on tiny shapes: the plumbing, not the numbers
  section clip_step python3 benchmarks/clip_step.py --models tiny:8,tiny:16 --steps 2 \
    --out "$OUT/clip_step"
  section clip_attention python3 benchmarks/clip_step.py --models tiny:8 --steps 2 \
    --attention xla,pallas --out "$OUT/clip_attention"
  section attention python3 benchmarks/attention.py --smoke --backends xla,pallas \
    --repeats 2 --in_process --out "$OUT/attention"
  section data python3 benchmarks/data_throughput.py --num_images 64 --batch 16 --batches 2 \
    --threads 0,2 --steps 2 --train_threads 2 --fif_synth '' --workdir "$OUT/data_work" \
    --out "$OUT/data"
  section vlm_step python3 benchmarks/vlm_step.py --mode train --train_shapes 2:128 \
    --connectors linear,perceiver --repeats 2 --out "$OUT/vlm_step"
  section open_clip python3 benchmarks/vs_open_clip.py --models tiny:16 --steps 2 --rounds 1 \
    --out "$OUT/open_clip"
else
  section clip_step python3 benchmarks/clip_step.py --models ViT-B-16:256,ViT-B-16:512 \
    --dtype bfloat16 --steps 10 --out "$OUT/clip_step"
  section clip_attention python3 benchmarks/clip_step.py --models ViT-B-16:256 \
    --dtype bfloat16 --steps 10 --attention pallas,cudnn,xla --out "$OUT/clip_attention"
  section attention python3 benchmarks/attention.py --repeats 10 --in_process \
    --out "$OUT/attention"
  section data python3 benchmarks/data_throughput.py --num_images 2000 --batch 256 \
    --batches 8 --threads 0,4,8,16 --steps 5 --train_threads 16 --fif_synth '' \
    --workdir /tmp/campaign_data --out "$OUT/data"
  section vlm_step python3 benchmarks/vlm_step.py --mode train --dtype bfloat16 \
    --lm_size small --train_shapes 16:1024 --repeats 5 --out "$OUT/vlm_step"
  section open_clip python3 benchmarks/vs_open_clip.py --models ViT-B-16:256 --device cuda \
    --dtype bfloat16 --steps 10 --rounds 2 --out "$OUT/open_clip"
fi

{
  echo "# GPU campaign ($(date -u +%Y-%m-%d), $([ "$DRY" = 1 ] && echo 'dry run: tiny shapes' || echo 'full'))"
  echo
  echo "Command: \`bash benchmarks/gpu_campaign.sh $([ "$DRY" = 1 ] && echo '--dry-run ')--out $OUT\`; failed sections: ${FAILED[*]:-none}."
  for name in clip_step clip_attention attention data vlm_step open_clip; do
    echo
    if [ -f "$OUT/$name.md" ]; then sed 's/^# /## /' "$OUT/$name.md"; else echo "## $name: no result"; fi
  done
} > "$OUT/campaign.md"
echo "wrote $OUT/campaign.md; failed sections: ${FAILED[*]:-none}" | tee -a "$LOG"
[ ${#FAILED[@]} -eq 0 ]
