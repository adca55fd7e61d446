#!/usr/bin/env bash
# The GPU measurements of docs/RESULTS.md in one go, on one GPU (about 10-12 minutes on an H100
# or H200): SmolLM2-135M-Instruct distilled on GSM8K train, then its decoding and training speed.
#
#   bash tools/gpu_run.sh --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --gsm8k DIR [--out DIR]
#   bash tools/gpu_run.sh --ckpt checkpoints/smollm2-135m-instruct --gsm8k DIR    # converted already
#   bash tools/gpu_run.sh --tiny      # every step on the CPU at toy sizes, to check the script
#                                     # (~2 minutes): the embedded teacher, synthetic problems
#   bash tools/gpu_run.sh --tiny --gguf FILE --gsm8k DIR   # the same with SmolLM2 (~13 minutes)
#   bash tools/gpu_run.sh ... --answers own    # distill on the teacher's own answers to GSM8K
#                                              # train (tools/own_answers.py), written first
#
# --gsm8k DIR holds GSM8K's train.jsonl and test.jsonl. Needs one CUDA GPU and requirements.txt;
# `pip install gguf` to convert --gguf; transformers for step 4's comparison rows (without it they
# are skipped with a message). Steps, most valuable first, each under its own time limit:
#   1. convert the GGUF (2 min); distill it on GSM8K train for 4 minutes (6 min: bf16, 32 x 256
#      tokens per step, k_max 4, the cool-down inside the 4 minutes); bench 500 GSM8K test
#      problems in one batch, fp32 (6 min): static k=1, ConfAdapt 0.9 and 0.95, verified static
#      k_max and verified ConfAdapt, with the teacher's NLL and "same as k=1"
#   2. batch 1 on that student, bf16, CUDA graphs (4 min): speedup over static k=1, tokens per pass
#   3. 16 sequences at once, same settings (3 min): tokens/s over static k=1's
#   4. batch-1 static k=1 against transformers generate, bf16: CUDA graphs (2 min), torch.compile
#      (4 min)
#   5. the training step against a plain next-token step, k drawn, every packed length warmed up
#      before timing (2 min), then compiled (5 min)
#   6. optional: steps 2 and 3 at temperature 0.7, only if `python bench.py --help` lists
#      --temperature (5 min)
# Every step writes its table and log into --out (default runs/gpu) as soon as it ends and says
# how it ended; a step that fails or runs out of time costs its own limit, not the later steps.
# The last lines printed (also OUT/summary.md, from `python -m tools.gpu_summary OUT`) give each
# figure with its step, command and unit.
set -u -o pipefail

usage="usage: bash tools/gpu_run.sh (--gguf FILE | --ckpt DIR) --gsm8k DIR [--out DIR] [--tiny]
       [--answers reference|own]"
GGUF="" CKPT="" GSM8K="" OUT=runs/gpu TINY=0 ANSWERS=reference
while [ $# -gt 0 ]; do
  case $1 in
    --gguf) GGUF=${2:?$usage}; shift 2 ;;
    --ckpt) CKPT=${2:?$usage}; shift 2 ;;
    --gsm8k) GSM8K=${2:?$usage}; shift 2 ;;
    --out) OUT=${2:?$usage}; shift 2 ;;
    --tiny) TINY=1; shift ;;
    --answers) ANSWERS=${2:?$usage}; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;    # the lines above
    *) echo "unknown argument $1"; echo "$usage"; exit 2 ;;
  esac
done
case $ANSWERS in reference|own) ;; *) echo "--answers must be reference or own"; exit 2 ;; esac
abspath() { case $1 in /*|"") echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
GGUF=$(abspath "$GGUF") CKPT=$(abspath "$CKPT") GSM8K=$(abspath "$GSM8K") OUT=$(abspath "$OUT")
cd "$(dirname "$0")/.."                       # the repository root: the tools run as modules
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" || exit 2
exec > >(tee "$OUT/run.log") 2>&1             # everything printed, also in OUT/run.log
T0=$(date +%s)

# -----------------------------------------------------------------------------
# Sizes: the real run on the GPU, or toy sizes on the CPU (--tiny)

if [ $TINY = 1 ]; then
  DEV=cpu; GRAPHS=eager; DTYPE=fp32; SLOWER=4   # the time limits are the GPU's, 4 times longer
  MINUTES=0.1; DISTILL="--recipe paper --steps 40 --seq-len 64 --micro-batch 4 --step-tokens 256 --warmup 1
    --cooldown 1 --log-every 2"
  N_BENCH=8; NEW_BENCH=16; N_B1=2; N_B16=16; NEW_SPEED=12; NEW_DECODE=16; REPEATS=1
  N_OWN=64; OWN_BATCH=32
  TRAIN_SIZES="--seq-len 64 --batch 4 --k 4"; TRAIN_STEPS=2
else
  DEV=cuda; GRAPHS=graphs; DTYPE=bf16; SLOWER=1
  MINUTES=4; DISTILL="--recipe paper --steps 100000 --seq-len 256 --micro-batch 32 --step-tokens 8192 --lr 5e-5
    --warmup 100 --cooldown 500 --log-every 100"
  N_BENCH=500; NEW_BENCH=256; N_B1=16; N_B16=64; NEW_SPEED=128; NEW_DECODE=128; REPEATS=3
  N_OWN=7473; OWN_BATCH=512                    # every GSM8K train question, 512 per pass
  TRAIN_SIZES="--seq-len 160 --batch 64 --k 16"; TRAIN_STEPS=10
fi

# -----------------------------------------------------------------------------
# The inputs: the teacher checkpoint and the data

fail() { echo "error: $*"; echo "$usage"; exit 2; }
if [ -n "$GGUF" ]; then
  [ -f "$GGUF" ] || fail "--gguf $GGUF: no such file"
  $PY -c "import gguf" 2>/dev/null || fail "converting --gguf needs the gguf package (pip install gguf)"
  TEACHER=$OUT/teacher
elif [ -n "$CKPT" ]; then
  [ -f "$CKPT/config.json" ] || fail "--ckpt $CKPT: no config.json there"
  TEACHER=$CKPT
elif [ $TINY = 1 ]; then
  TEACHER=checkpoints/synth-teacher        # the embedded default teacher stands in for SmolLM2
else
  fail "give the model: --gguf FILE (SmolLM2-135M-Instruct.Q4_1.gguf) or --ckpt DIR"
fi
if [ -z "$GSM8K" ] && [ $TINY = 1 ]; then   # synthetic problems in GSM8K's format stand in
  GSM8K=$OUT/synthetic; mkdir -p "$GSM8K"
  $PY - "$GSM8K" <<'EOF'
import json, os, sys
from synthetic.problems import SYNTHETIC_TEST_SEED, synthetic_problems
for split, n, seed in (("train", 2000, 0), ("test", 200, SYNTHETIC_TEST_SEED)):
    with open(os.path.join(sys.argv[1], f"{split}.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in synthetic_problems(n, seed))
EOF
fi
[ -n "$GSM8K" ] || fail "give GSM8K: --gsm8k DIR (holding train.jsonl and test.jsonl)"
for split in train test; do
  [ -f "$GSM8K/$split.jsonl" ] || fail "--gsm8k $GSM8K: no $split.jsonl there"
done
TRAIN_DATA=$GSM8K/train.jsonl; TEST_DATA=$GSM8K/test.jsonl
DISTILL_DATA=$TRAIN_DATA                    # --answers own: the teacher's answers instead
STUDENT=$OUT/student/ckpt
# no figure of an earlier run in OUT is read as this one's
rm -rf "$OUT/student"
rm -f "$OUT"/{gsm8k,b1,b16,b1_t07,b16_t07,decode,decode_compile,train,train_compile}.{json,md,log}

# -----------------------------------------------------------------------------
# Helpers

ENDED=()              # how each step ended: printed at the end, and in OUT/steps.tsv
: > "$OUT/steps.tsv"
# run LIMIT NAME CMD...: CMD under a time limit of LIMIT seconds (on the GPU), what it prints in
# OUT/NAME.log; then says how it ended
run() {
  local limit=$(( $1 * SLOWER )) name=$2; shift 2
  local t=$(date +%s) rc how
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1; rc=$?
  case $rc in
    0) how="done in $(( $(date +%s) - t )) s" ;;
    124|137) how="stopped at its $limit s limit" ;;
    *) how="failed (exit $rc) after $(( $(date +%s) - t )) s" ;;
  esac
  echo "[$name] $how"
  ENDED+=("$name: $how"); printf '%s\t%s\n' "$name" "$how" >> "$OUT/steps.tsv"
  [ $rc = 0 ] || tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
  return $rc
}
skip() {
  echo "[$1] skipped: $2"
  ENDED+=("$1: skipped: $2"); printf '%s\tskipped: %s\n' "$1" "$2" >> "$OUT/steps.tsv"
}
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
tables() { grep -hE "^\||^MTP / NTP|rror|arning|not installed" "$@" 2>/dev/null; }
# bench NAME LIMIT ARGS...: bench.py on the student, its table in OUT/NAME.md and .json
bench() {
  local name=$1 limit=$2; shift 2
  if [ ! -f "$STUDENT/model.safetensors" ]; then skip "$name" "no student (step 1)"; return; fi
  run "$limit" "$name" $PY bench.py --ckpt "$STUDENT" --data "$TEST_DATA" --format $FORMAT \
    --device $DEV --out "$OUT/$name" "$@"
  cat "$OUT/$name.md" 2>/dev/null; tables "$OUT/$name.log" | grep -v "^|"
}

step "the machine"
[ $TINY = 1 ] || $PY -c "import torch; assert torch.cuda.is_available()" 2>/dev/null ||
  fail "no CUDA GPU found (bash tools/gpu_run.sh --tiny runs the steps on the CPU at toy sizes)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY - <<'EOF'
from importlib.metadata import PackageNotFoundError, version
import torch
versions = [f"torch {torch.__version__}"]
for name in ("transformers", "gguf"):
    try:
        versions.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        versions.append(f"{name} not installed")
print(" | ".join(versions), "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
EOF
echo "teacher $TEACHER | data $GSM8K | answers trained on: $ANSWERS | out $OUT"

# -----------------------------------------------------------------------------
# 1. The real run: convert, distill for $MINUTES minutes, bench GSM8K test in one batch

step "1. convert, distill for $MINUTES minutes, bench $N_BENCH test problems in one batch"
if [ -n "$GGUF" ]; then
  run 120 convert $PY -m tools.convert_gguf "$GGUF" "$TEACHER" && tail -n 3 "$OUT/convert.log"
fi
# --answers own: the teacher's own answers to the training questions, written once into OUT
# (a later run with the same settings finds them there and goes straight on)
if [ $ANSWERS = own ] && [ -f "$TEACHER/config.json" ]; then
  if run 300 own_answers $PY -m tools.own_answers --ckpt "$TEACHER" --data "$TRAIN_DATA" \
      --limit $N_OWN --out "$OUT/own_answers.jsonl" --batch $OWN_BATCH --max-new $NEW_BENCH \
      --device $DEV; then
    tail -n 2 "$OUT/own_answers.log"; DISTILL_DATA=$OUT/own_answers.jsonl
  else
    DISTILL_DATA=""                         # never the references in place of the own answers
  fi
fi
if [ -z "$DISTILL_DATA" ]; then
  skip distill "no own answers (step own_answers)"
elif [ -f "$TEACHER/config.json" ]; then
  run $(awk "BEGIN { print int($MINUTES * 60 + 120) }") distill $PY distill.py --init "$TEACHER" \
    --data "$DISTILL_DATA" --k 4 --out "$OUT/student" --overwrite --minutes $MINUTES $DISTILL \
    --save-every 1000 --device $DEV
  grep -E "^step|minutes|rror" "$OUT/distill.log" | tail -n 6
else
  skip distill "no teacher checkpoint"
fi
# prompts in the model's chat format (SmolLM2's), or "Q: ... A:" for a model without one
FORMAT=$($PY -c "import json, sys; print('chat' if json.load(open(sys.argv[1])).get('chat') else 'qa')" \
  "$TEACHER/tokenizer_mtp.json" 2>/dev/null || echo chat)
bench gsm8k 360 --limit $N_BENCH --batch $N_BENCH --max-new $NEW_BENCH --dtype fp32 \
  --engine eager --static-k 1 --tau 0.9,0.95 --teacher "$TEACHER"

# -----------------------------------------------------------------------------
# 2./3. Speed on the student: batch 1 and 16 sequences at once (CUDA graphs on the GPU)

SPEED="--max-new $NEW_SPEED --dtype $DTYPE --engine $GRAPHS --static-k 1 --tau 0.9"
step "2. batch 1, $N_B1 problems, $DTYPE, engine $GRAPHS: speedup over static k=1, tokens per pass"
bench b1 240 --limit $N_B1 --batch 1 $SPEED
step "3. 16 sequences at once, $N_B16 problems, $DTYPE, engine $GRAPHS: tokens/s over static k=1's"
bench b16 180 --limit $N_B16 --batch 16 $SPEED

# -----------------------------------------------------------------------------
# 4. Batch-1 static k=1 against transformers generate (same weights, prompt and dtype)

step "4. batch-1 static k=1 against transformers generate, $DTYPE, $NEW_DECODE tokens"
DECODE=(--ckpt "$TEACHER" --device $DEV --dtype $DTYPE --max-new $NEW_DECODE --repeats $REPEATS)
run 120 decode $PY -m tools.bench_decode "${DECODE[@]}" --engines eager,$GRAPHS --out "$OUT/decode.json"
tables "$OUT/decode.log"
if [ $TINY = 1 ]; then
  skip decode_compile "torch.compile is measured on the GPU"
else
  run 240 decode_compile $PY -m tools.bench_decode "${DECODE[@]}" --engines compile \
    --out "$OUT/decode_compile.json"
  tables "$OUT/decode_compile.log"
fi

# -----------------------------------------------------------------------------
# 5. The training step: MTP against plain next-token, k drawn, then compiled

step "5. the training step, k drawn, every packed length warmed up before timing; then compiled"
TRAIN=(--init "$TEACHER" --data "$TRAIN_DATA" $TRAIN_SIZES --steps $TRAIN_STEPS --device $DEV)
# the batch set is --steps batches, each of its own packed length: as many warm-up steps see
# every length once. bench_train prints its JSON line last: that line is the step's JSON file
run 120 train $PY -m tools.bench_train "${TRAIN[@]}" --warmup-steps $TRAIN_STEPS &&
  tail -n 1 "$OUT/train.log" > "$OUT/train.json"
tables "$OUT/train.log"
if [ $TINY = 1 ]; then
  skip train_compile "torch.compile is measured on the GPU"
else
  # compiled, the warm-up is one pass over the batch set + 2 (bench_train's default)
  run 300 train_compile $PY -m tools.bench_train "${TRAIN[@]}" --compile &&
    tail -n 1 "$OUT/train_compile.log" > "$OUT/train_compile.json"
  tables "$OUT/train_compile.log"
fi

# -----------------------------------------------------------------------------
# 6. Optional: steps 2 and 3 when sampling at temperature 0.7 (verified sampling)

step "6. (optional) steps 2 and 3 at temperature 0.7"
if $PY bench.py --help | grep -q -- --temperature; then
  bench b1_t07 150 --limit $N_B1 --batch 1 $SPEED --temperature 0.7
  bench b16_t07 150 --limit $N_B16 --batch 16 $SPEED --temperature 0.7
else
  skip temperature "bench.py has no --temperature"
fi

# -----------------------------------------------------------------------------
# Summary

step "summary ($(( ($(date +%s) - T0) / 60 )) min $(( ($(date +%s) - T0) % 60 )) s in all)"
printf '%s\n' "${ENDED[@]}"
echo
$PY -m tools.gpu_summary "$OUT"
echo "tables and logs: $OUT"
