#!/usr/bin/env bash
# The package as a new user gets it: a plain `pip install` (not editable, no constraints file)
# of a fresh copy of the checkout into a fresh venv, then, from another folder, the commands
# of the README's first screen:
#
#   fomo-jax --help
#   fomo-jax run  --config=fif_synth:smoke --workdir=W
#   fomo-jax eval --config=fif_synth:smoke --model=W/model --workdir=W2
#
# Checks that eval reproduces the run's final A_KA / A_ZS within 0.05 points, that nothing was
# written inside site-packages nor into the clone (outputs and data go under the current
# folder, caches into the user's cache directory), and prints the install's time and size.
# Last, every notebook of colab/ is executed with nbclient from the root of the clone, install
# cell (`pip install .`) included, in this same throwaway venv (nbclient and ipykernel added
# from the package index), never in the test environment; each must finish within 10 minutes.
# Exits non-zero on any failure. Usage: bash .ci/install_check.sh  (KEEP=1 keeps the temp dir;
# NOTEBOOKS=0 skips the notebooks)
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/fomo_jax_install_check.XXXXXX")"
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$TMP"' EXIT
SRC="$TMP/src" VENV="$TMP/venv" WORK="$TMP/work" CACHE="$TMP/cache"
mkdir -p "$SRC" "$WORK" "$CACHE"

fail() { echo "install_check: FAIL: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }

# A fresh clone of the working tree: the files git tracks or would track (no build/, no
# *.egg-info, no venv, no runs/), so nothing left over from a local build can ship. Outside
# git (an unpacked source archive) the folder is copied as it is.
step "copy of the checkout -> $SRC"
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  git -C "$REPO" ls-files -z --cached --others --exclude-standard \
    | (cd "$REPO" && tar --null --ignore-failed-read -cf - -T - 2>/dev/null) \
    | tar -xf - -C "$SRC"
else
  cp -a "$REPO/." "$SRC"
fi

step "pip install $SRC (not editable, no constraints file)"
"$PYTHON" -m venv "$VENV"
start=$(date +%s)
env -u PIP_CONSTRAINT "$VENV/bin/python" -m pip install --quiet "$SRC"
install_seconds=$(( $(date +%s) - start ))
echo "  ${install_seconds} s"
cd "$WORK"  # from here on, not the checkout: `import fomo_jax` must find the installed package
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
[[ "$("$VENV/bin/python" -c 'import fomo_jax, os; print(os.path.dirname(fomo_jax.__file__))')" \
   == "$SITE/fomo_jax" ]] || fail "fomo_jax is not imported from $SITE"

# Every file of site-packages with its size and modification time, before and after the runs.
listing() { find "$SITE" -printf '%P %s %T@\n' | sort; }
listing > "$TMP/site.before"
touch "$TMP/runs.stamp"

# From another folder, with the user's cache directory pointed into the temp dir so the check
# can see where the compilation cache goes (and leaves the real one alone).
export PATH="$VENV/bin:$PATH" XDG_CACHE_HOME="$CACHE"
unset FOMO_JAX_CACHE_DIR

step "fomo-jax --help"
fomo-jax --help >"$TMP/help.txt" || fail "fomo-jax --help exited non-zero"
grep -q "usage: fomo-jax COMMAND" "$TMP/help.txt" || fail "fomo-jax --help: no usage line"
for command in run eval sweep compare merge prepare plot-schedule; do
  fomo-jax "$command" --help >/dev/null || fail "fomo-jax $command --help exited non-zero"
done

step "fomo-jax run --config=fif_synth:smoke --workdir=W"
fomo-jax run --config=fif_synth:smoke --workdir=W
[[ -f W/results.json && -d W/model ]] || fail "the run left no W/results.json or W/model"

step "fomo-jax eval --config=fif_synth:smoke --model=W/model --workdir=W2"
fomo-jax eval --config=fif_synth:smoke --model=W/model --workdir=W2
[[ -f W2/eval.json ]] || fail "fomo-jax eval wrote no W2/eval.json"

step "eval.json against the run's final (within 0.05 points)"
python - <<'EOF' || fail "eval does not reproduce the run's final scores"
import json

final = json.load(open("W/results.json"))["final"]
evaluated = json.load(open("W2/eval.json"))
worst = 0.0
for key in ("knowledge_accumulation", "zero_shot_retention"):
    gap = abs(evaluated[key] - final[key])
    worst = max(worst, gap)
    print(f"  {key:24s} run {final[key]:8.3f}   eval {evaluated[key]:8.3f}   |diff| {gap:.4f}")
raise SystemExit(worst > 0.05)
EOF

step "where things were written"
listing > "$TMP/site.after"
if ! diff -q "$TMP/site.before" "$TMP/site.after" >/dev/null; then
  diff "$TMP/site.before" "$TMP/site.after" | head -20 >&2 || true  # head closes the pipe
  fail "the commands wrote inside site-packages ($SITE)"
fi
echo "  nothing written inside site-packages"
# The fresh clone the package was installed from (pip builds in it: build/, *.egg-info, so
# from the runs on). The working checkout itself is not watched: developers edit it meanwhile,
# and the installed package holds no path to it.
written="$(find "$SRC" -newer "$TMP/runs.stamp" -print | head -20)"
[[ -z "$written" ]] || fail "written into the clone installed from: $written"
echo "  nothing written into the clone installed from"
[[ -d runs/fif_synth_smoke_data ]] || fail "the smoke data is not under the current folder"
echo "  data under the current folder: $(du -sh runs/fif_synth_smoke_data | cut -f1)"
[[ -n "$(ls -A "$CACHE/fomo_jax/jax_cache" 2>/dev/null)" ]] \
  || fail "no compilation cache under \$XDG_CACHE_HOME/fomo_jax/jax_cache"
echo "  compilation cache in the user's cache directory: $(du -sh "$CACHE/fomo_jax/jax_cache" | cut -f1)"

step "the core install"
echo "  pip install: ${install_seconds} s wall ($("$VENV/bin/python" --version))"
echo "  venv: $(du -sh "$VENV" | cut -f1); site-packages: $(du -sh "$SITE" | cut -f1)"

if [[ "${NOTEBOOKS:-1}" == 1 ]]; then
  step "the notebooks (nbclient, from the root of $SRC, install cell included)"
  "$VENV/bin/python" -m pip install --quiet nbclient ipykernel
  cd "$SRC"
  for notebook in colab/*.ipynb; do
    start=$(date +%s)
    "$VENV/bin/python" - "$notebook" <<'EOF' || fail "$notebook did not run through"
import sys

import nbformat
from nbclient import NotebookClient

path = sys.argv[1]
notebook = nbformat.read(path, as_version=4)
client = NotebookClient(
    notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": "."}}
)
try:
    client.execute()
except Exception as error:  # the failing cell's source and output are in the message
    sys.exit(f"{path}: {error}")
EOF
    seconds=$(( $(date +%s) - start ))
    echo "  $notebook: ${seconds} s"
    (( seconds <= 600 )) || fail "$notebook took ${seconds} s, more than 10 minutes"
  done
fi
echo "install_check: OK"
