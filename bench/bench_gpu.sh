#!/usr/bin/env bash
# GPU runs, side by side on one CUDA GPU: FunGPT's GPU speedrun preset, nanoGPT's GPU recipe for Tiny
# Shakespeare char (the reference), and FunGPT's copy of that recipe (configs/shakespeare-char.toml).
#
#   bash bench/bench_gpu.sh OUT_DIR [SECONDS [RUN...]]
#
# Runs, in order of importance (or the RUNs named), each only while SECONDS (default 540) of wall time are left:
#   speedrun        fungpt train --config configs/speedrun-gpu.toml     (900 steps or 60 s, uncompiled)
#   nanogpt         nanoGPT's train.py config/train_shakespeare_char.py  (its defaults: bf16, compile)
#   char-compile    fungpt train --config configs/shakespeare-char.toml --train.compile
#   speedrun-seed2, speedrun-compile: the speedrun with another seed, or compiled (the compile inside the minute)
#   speedrun-600, speedrun-1200, speedrun-time60: the speedrun capped at 600 or 1,200 steps, or by the minute alone
#   profile         bench/profile_step.py on the GPU recipe's shape, uncompiled and compiled
#   startup         (only when named) the speedrun's start-up under cProfile
#   tests           (only when named) python -m pytest tests/test_gpu.py: the checks that need a CUDA GPU
# Every run's log, metrics.jsonl and config land in OUT_DIR/<name>/; OUT_DIR/summary.txt has one line per run:
# the command's wall time, steps, median ms per step and the final val loss (FunGPT: over the entire val
# split; nanoGPT: its estimate from 200 random batches, as its README reports).
# Needs: python with torch (CUDA build) and FunGPT's dependencies; Tiny Shakespeare in $FUNGPT_DATA_DIR;
# nanoGPT's files in $NANOGPT_DIR (default ../shared/anchors/nanoGPT); $PYTHON (default python3).
set -u
case ${1:-} in
  -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
  -*|'') echo "usage: bash bench/bench_gpu.sh OUT_DIR [SECONDS [RUN...]] (--help: what it runs)" >&2; exit 2;;
esac
out=$1
seconds=${2:-540}
case $seconds in ''|*[!0-9]*) echo "bench_gpu.sh: SECONDS must be a whole number, got '$seconds'" >&2; exit 2;; esac
: "${FUNGPT_DATA_DIR:?set FUNGPT_DATA_DIR to the folder holding tinyshakespeare.txt}"
absolute() { case $1 in /*) echo "$1";; */*|.*) echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")";; *) echo "$1";; esac; }
py=$(absolute "${PYTHON:-python3}")  # (nanoGPT and FunGPT run in other folders)
data=$(absolute "$FUNGPT_DATA_DIR")
root=$(cd "$(dirname "$0")/.." && pwd)
nanogpt=$(absolute "${NANOGPT_DIR:-$root/../shared/anchors/nanoGPT}")
read -r -a extra <<<"${FUNGPT_EXTRA:-}"  # e.g. "--train.device cpu --train.max-iters 2": a CPU check of this script
export FUNGPT_DATA_DIR=$data
mkdir -p "$out"
out=$(cd "$out" && pwd)
deadline=$(( $(date +%s) + seconds ))
summary=$out/summary.txt
export PYTHONUNBUFFERED=1 PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

{
  echo "# bench_gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
  "$py" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')" 2>&1
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
  echo "fungpt: $(git -C "$root" describe --always --dirty 2>/dev/null || echo 'commit unknown (no git)')"
  # (flags added to every FunGPT run change what the numbers mean: say them)
  [ -z "${FUNGPT_EXTRA:-}" ] || echo "FUNGPT_EXTRA (added to every FunGPT run): $FUNGPT_EXTRA"
} | tee "$summary"

left() { echo $(( deadline - $(date +%s) )); }
# enough NAME NEEDED_S: whether NEEDED_S seconds are left for the run NAME (else it says it is skipped)
enough() {
  [ "$(left)" -ge "$2" ] && return 0
  echo "$1: skipped ($(left) s left, needs $2)" | tee -a "$summary"
  return 1
}

# fungpt NAME NEEDED_S ARGS...: one `fungpt train` run, if NEEDED_S seconds are left
fungpt() {
  local name=$1 need=$2; shift 2
  enough "$name" "$need" || return
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout "$(left)" "$py" -m fungpt train "$@" ${extra[@]+"${extra[@]}"} --out-dir "$out/$name" --overwrite >"$out/$name.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  rm -rf "$out/$name/checkpoints"  # weights are not needed for the numbers (and are too big to bring back)
  "$py" - "$name" "$rc" "$t0" "$t1" "$out/$name/metrics.jsonl" <<'PY' | tee -a "$summary"
import json, statistics, sys
name, rc, t0, t1, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
rows = []
try:
    for line in open(path):
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by the timeout
            pass
except OSError:
    pass
steps = [r for r in rows if "dt_ms" in r]
evals = [r for r in rows if "val_loss" in r]
# A step as nanoGPT's dt times it: the loop's whole period, from one train row to the next (log_interval steps
# apart, no eval between them), from step 20 on as nanoGPT's median below; dt_ms is the step's body alone
periods = [1000 * (r["elapsed_s"] - q["elapsed_s"]) / (r["step"] - q["step"]) for q, r in zip(rows, rows[1:])
           if "dt_ms" in q and "dt_ms" in r and r["step"] > q["step"] >= 20]
ms = statistics.median(periods) if periods else float("nan")
body = statistics.median(r["dt_ms"] for r in steps[1:]) if len(steps) > 1 else float("nan")
final = evals[-1] if evals else {}
print(f"{name}: rc={rc} wall_s={t1 - t0:.1f} steps={final.get('step', steps[-1]['step'] if steps else 0)} "
      f"median_ms_per_step={ms:.2f} (loop period; step body {body:.2f}) "
      f"final_val={final.get('val_loss', float('nan')):.4f} "
      f"best_val={min((r['val_loss'] for r in evals), default=float('nan')):.4f} "
      f"tokens_per_s={statistics.median(r['tokens_per_sec'] for r in steps[1:]) if len(steps) > 1 else 0:.0f}")
PY
  [ "$rc" = 0 ] || tail -5 "$out/$name.log" | tee -a "$summary"
}

# nanoGPT's GPU recipe, exactly as its README runs it, in a scratch copy
nanogpt_run() {
  enough nanogpt "$1" || return
  if [ ! -f "$nanogpt/train.py" ]; then  # (said in the summary, not as cp and cd errors)
    echo "nanogpt: skipped (no nanoGPT at $nanogpt: set NANOGPT_DIR)" | tee -a "$summary"
    return
  fi
  local w t0 t1 rc
  w=$(mktemp -d)
  trap 'rm -rf "$w"' RETURN
  cp -r "$nanogpt/." "$w/"
  cp "$data/tinyshakespeare.txt" "$w/data/shakespeare_char/input.txt"
  (cd "$w/data/shakespeare_char" && "$py" prepare.py >/dev/null)
  t0=$(date +%s.%N)
  (cd "$w" && PYTHONPATH= timeout "$(left)" "$py" train.py config/train_shakespeare_char.py --out_dir="$w/out" \
    >"$out/nanogpt.log" 2>&1)
  rc=$?
  t1=$(date +%s.%N)
  "$py" - "$rc" "$t0" "$t1" "$out/nanogpt.log" <<'PY' | tee -a "$summary"
import re, statistics, sys
rc, t0, t1, log = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), open(sys.argv[4]).read()
vals = re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", log, re.M)
ms = [float(t) for i, t in re.findall(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", log, re.M) if int(i) >= 20]
print(f"nanogpt: rc={rc} wall_s={t1 - t0:.1f} steps={vals[-1][0] if vals else 0} "
      f"median_ms_per_step={statistics.median(ms) if ms else float('nan'):.2f} "
      f"final_val={float(vals[-1][1]) if vals else float('nan'):.4f} "
      f"best_val={min((float(v) for _, v in vals), default=float('nan')):.4f}")
PY
}

cd "$root"
speedrun=(--config configs/speedrun-gpu.toml)
runs=("${@:3}")
[ ${#runs[@]} -gt 0 ] || runs=(speedrun nanogpt char-compile speedrun-seed2 speedrun-compile speedrun-600
                               speedrun-1200 speedrun-time60 profile)
for name in "${runs[@]}"; do
  case $name in
    speedrun) fungpt speedrun 75 "${speedrun[@]}" ;;
    nanogpt) nanogpt_run 170 ;;  # 140 s on an H200
    char-compile) fungpt char-compile 170 --config configs/shakespeare-char.toml --train.compile ;;
    speedrun-seed2) fungpt speedrun-seed2 75 "${speedrun[@]}" --train.seed 2 ;;
    speedrun-compile) fungpt speedrun-compile 75 "${speedrun[@]}" --train.compile ;;
    speedrun-600) fungpt speedrun-600 75 "${speedrun[@]}" --train.max-iters 600 ;;
    speedrun-1200) fungpt speedrun-1200 75 "${speedrun[@]}" --train.max-iters 1200 ;;
    speedrun-time60) fungpt speedrun-time60 75 "${speedrun[@]}" --train.max-iters 1000000 ;;  # the minute alone
    profile)  # where the recipe's step goes on the GPU, and what reading the loss back every step costs
      for c in "" --compile; do
        enough "profile$c" 60 || continue
        timeout "$(left)" "$py" bench/profile_step.py --device cuda --shape 6,6,384,256 --batch-size 64 $c \
          >"$out/profile$c.log" 2>&1
        echo "profile$c: rc=$? $(grep -m2 'ms' "$out/profile$c.log" | tr '\n' ' ')" | tee -a "$summary"
      done ;;
    startup)  # where the 10-14 s before the speedrun's first step go: the whole command under cProfile, 5 steps
      enough startup 45 || continue
      timeout "$(left)" "$py" - "$out/startup" >"$out/startup.log" 2>&1 <<'PY'
import cProfile, pstats, sys, time
t0 = time.time()
from fungpt.cli import main  # (the imports are part of the start-up)
print(f"importing fungpt.cli: {time.time() - t0:.1f} s")
cProfile.run(f"main(['train', '--config', 'configs/speedrun-gpu.toml', '--train.max-iters', '5', "
             f"'--out-dir', {sys.argv[1]!r}, '--overwrite'])", sys.argv[1] + ".prof")
pstats.Stats(sys.argv[1] + ".prof").sort_stats("cumulative").print_stats(45)
PY
      echo "startup: rc=$? $(grep -m1 'importing' "$out/startup.log")" | tee -a "$summary"
      rm -rf "$out/startup" ;;
    tests)  # the CUDA tests (tests/test_gpu.py; skipped on machines without a GPU)
      enough tests 150 || continue
      timeout "$(left)" "$py" -m pytest tests/test_gpu.py -p no:cacheprovider >"$out/tests.log" 2>&1
      echo "tests: rc=$? $(tail -1 "$out/tests.log")" | tee -a "$summary" ;;
    *) echo "unknown run $name" | tee -a "$summary" ;;
  esac
done
echo "done, $(left) s of $seconds left" | tee -a "$summary"
