#!/usr/bin/env bash
# The GPU measurements of the README's "On one H100" section, one part per call of a lent GPU
# machine (15 device-minutes a session, starts included; a part's steps fit its 10-minute call):
#
#   bash gpu_run.sh stash     # call 1 (carry .gg1 .whl): the machine and the CUDA tests; keeps
#                             #   the GGUF's first half (and GSM8K) in /tmp for the next call
#   bash gpu_run.sh smol      # call 2 (carry .gg2 .whl), right after: SmolLM2-135M-Instruct.
#                             #   2. batch-1 decoding vs transformers; 5. a GSM8K distillation
#                             #   (SMOL_MIN minutes) then 3./4. its batch-1 and batch-16 speed and
#                             #   5. its 500-problem bench
#   bash gpu_run.sh extra     # call 3, if time is left (no carry): what smol had no time for,
#                             #   item 1 with k drawn after a warm-up over every packed length,
#                             #   then the torch.compile rows of items 1 and 2
#   bash gpu_run.sh default   # the embedded default at 3000 steps (item 6) and the default
#                             #   recipe's fp32 students, benched (measured 2026-11-26; ~5 min)
#
# The SmolLM2 GGUF (98 MB) is more than one call may carry, so it travels in halves (.gg1/part1,
# .gg2/part2). A carried folder is gone at the next call; /tmp and ignored outputs (runs/,
# checkpoints/) stay while the machine is warm. Wheels the machine lacks (gguf) travel in .whl/.
# Every step has its own time limit (lim), so a slow or failing step costs its slot, not the
# call. At most 8 files come back from a call, so $OUT (default gpu_out/) holds two: PART.log,
# everything printed, and PART.tgz, the tables, JSON and logs, packed again after every step. TINY=1 runs the same steps on the CPU at toy
# sizes, with the embedded teacher standing in for SmolLM2.
set -u -o pipefail
part=${1:?usage: gpu_run.sh stash|smol|extra|default}
OUT=${OUT:-gpu_out}
D=runs/gpu_$part                              # the details, packed into $OUT/$part.tgz
rm -rf "$D"; mkdir -p "$OUT" "$D"
exec > >(tee -a "$OUT/$part.log") 2>&1
KEEP=${KEEP:-/tmp/mtp_gpu}                   # what outlives a call: the GGUF half, GSM8K, wheels
export PYTHONUNBUFFERED=1 MTP_CACHE=$KEEP/cache
PY=python3
T0=$(date +%s)
step() { tar czf "$OUT/$part.tgz" -C runs "gpu_$part"; echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
# a step's time limit: its own, or what is left of the part's budget (BUDGET s)
lim() { local left=$(( ${BUDGET:-570} - ($(date +%s) - T0) )); echo $(( $1 < left ? $1 : (left > 1 ? left : 1) )); }
# run_to LIMIT LOG CMD...: CMD under its time limit, its output in LOG; says how it ended. A step
# with under 20 s left is skipped (it could not load a model in that time)
run_to() {
  local l; l=$(lim "$1"); local log=$2; shift 2
  if [ "$l" -lt 20 ]; then echo "skipped: ${l} s left of BUDGET"; return 99; fi
  timeout "$l" "$@" > "$log" 2>&1; local rc=$?
  echo "exit $rc$([ $rc = 124 ] && echo ": out of its $l s")"; return $rc
}
if [ "${TINY:-0}" = 1 ]; then
  DEV=cpu; ENGINE=static; S3000=6; S800=6; LIMIT=4; BATCH=6; SMOL_MIN=${SMOL_MIN:-0.1}; GSM_LIMIT=8
  GSM_BATCH=8; NEW=24; SPEED_N=4; FMT=qa; GSMDATA=synthetic; SEQ=64; SMALL="--micro-batch 4 --step-tokens 640"
  BNEW="--max-new 12"; TRAIN="--seq-len 64 --batch 4 --k 4 --steps 3"; SMOL=checkpoints/synth-teacher
else
  DEV=cuda; ENGINE=graphs; S3000=3000; S800=800; LIMIT=1000; BATCH=250; SMOL_MIN=${SMOL_MIN:-4}
  GSM_LIMIT=500; GSM_BATCH=500; NEW=256; SPEED_N=16; FMT=chat; GSMDATA=gsm8k; SEQ=256; SMALL=""; BNEW=""
  TRAIN="--seq-len 160 --batch 64 --k 16 --steps 10"; SMOL=checkpoints/smollm2-135m-instruct
fi

if [ "$part" = stash ]; then           # before the wheels: they are stashed too
  mkdir -p "$KEEP" && cp -r .gg1/. "$KEEP"/ 2>/dev/null; cp -r .whl "$KEEP"/ 2>/dev/null
  ls -la "$KEEP"
fi
for w in .whl "$KEEP/.whl"; do
  if ls "$w"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$w"/*.whl && export PYTHONPATH=/tmp/site && break
  fi
done

smol_checkpoint() {   # the converted SmolLM2 (from this call's halves, or the joined file kept)
  [ "${TINY:-0}" = 1 ] || [ -f $SMOL/model.safetensors ] && return 0
  step "join and convert the GGUF"
  if [ ! -f "$KEEP/smol.gguf" ]; then
    if [ ! -f "$KEEP/part1" ] || [ ! -f .gg2/part2 ]; then
      echo "no $KEEP/part1 or .gg2/part2: run 'stash' (carry .gg1) then 'smol' (carry .gg2) on one warm machine"
      exit 3
    fi
    cat "$KEEP/part1" .gg2/part2 > "$KEEP/smol.gguf"
  fi
  sha256sum "$KEEP/smol.gguf"
  run_to 60 "$D/convert.log" $PY convert_gguf.py "$KEEP/smol.gguf" $SMOL; tail -4 "$D/convert.log"
}

speed_item() {        # 3./4. speed on the student, bf16: batch $1 over $2 problems
  run_to $3 "$D/speed_b$1.log" $PY bench.py --ckpt runs/smol/ckpt --data $GSMDATA --format $FMT \
    --limit $2 --batch $1 --max-new 128 --device $DEV --dtype bf16 --engine $ENGINE --static 1 \
    --taus 0.9 --lean --out "$D/speed_b$1"
  grep -E "^\| |error" "$D/speed_b$1.log"
  [ -f "$D/speed_b$1.json" ] && $PY - "$D/speed_b$1.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    print(f"  {r['strategy']:<36} speedup {r['speedup']:.2f}x / {r['eff_k']:.2f} tokens per pass "
          f"= {r['speedup'] / r['eff_k']:.2f}")
EOF
}

gsm_bench() {         # 5. the student on GSM8K test, fp32 (verified rows must equal k=1 exactly)
  run_to $1 "$D/bench_smol.log" $PY bench.py --ckpt runs/smol/ckpt --data $GSMDATA --format $FMT \
    --limit $GSM_LIMIT --batch $GSM_BATCH --max-new $NEW --device $DEV --dtype fp32 --static 1,2,3 \
    --taus 0.9,0.8 --teacher $SMOL --out "$D/bench_smol"
  grep -E "^\| |error|warning" "$D/bench_smol.log"
  # the table is rewritten after every strategy: a killed bench leaves a partial one
  grep -h "partial" "$D/bench_smol.md" 2>/dev/null
  grep -qs "partial" "$D/bench_smol.md" || cp "$D/bench_smol.json" runs/bench_smol.json 2>/dev/null
}

if [ "$part" = stash ]; then
  step "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
  step "CUDA tests"
  run_to 150 "$D/test_cuda.log" $PY -m pytest -q tests/test_cuda.py; tail -15 "$D/test_cuda.log"
  step "stash done"
  exit 0
fi

if [ "$part" = smol ]; then
  smol_checkpoint

  step "2. batch-1 decoding, ours (eager / CUDA graphs) vs transformers generate, bf16, 128 tokens"
  run_to 60 "$D/decode_b1.log" $PY bench_decode.py --ckpt $SMOL --device $DEV --dtype bf16 \
    --max-new $((NEW / 2)) --engines eager,$ENGINE --out "$D/decode_b1.json"
  grep -E "^\||^CPU|^NVIDIA|error" "$D/decode_b1.log"

  step "5. distill SmolLM2 on GSM8K train for $SMOL_MIN minutes (batch 32 x $SEQ tokens, k_max 4, bf16)"
  run_to $(awk "BEGIN { print int($SMOL_MIN * 60 + 60) }") "$D/train_smol.log" $PY distill.py \
    --init $SMOL --data $GSMDATA --k 4 --out runs/smol --overwrite --steps 100000 \
    --minutes $SMOL_MIN --seq-len $SEQ --micro-batch 32 --step-tokens $((32 * SEQ)) --lr 5e-5 \
    --warmup 100 --cooldown 500 --log-every 100 --save-every 500 --device $DEV $SMALL
  grep -E "^step|minutes|done|error" "$D/train_smol.log" | tail -n 12

  step "3. batch 1, $SPEED_N problems, bf16, $ENGINE"
  speed_item 1 $SPEED_N 70
  step "4. batch 16, $((4 * SPEED_N)) problems, bf16, $ENGINE"
  speed_item 16 $((4 * SPEED_N)) 60

  step "5. bench the student: $GSM_LIMIT GSM8K test problems, batch $GSM_BATCH, fp32, eager, every strategy"
  rm -f runs/bench_smol.json
  gsm_bench 400
  cp runs/smol/log.jsonl "$D/smol_log.jsonl" 2>/dev/null
  step "smol done"
  exit 0
fi

if [ "$part" = extra ]; then
  smol_checkpoint
  if [ -d runs/smol/ckpt ] && [ ! -f runs/bench_smol.json ]; then      # smol ran out of time
    step "5. (again) the student's GSM8K bench"
    gsm_bench 300
  fi
  step "1. training cost, SDPA, k drawn, warmed up over the whole batch set (every packed length)"
  run_to 60 "$D/train_cost.log" $PY bench_train.py --init $SMOL --data $GSMDATA $TRAIN --device $DEV \
    --warmup-steps 12
  grep -E "^\||MTP / NTP|^\{|rror" "$D/train_cost.log"
  if [ "$DEV" = cuda ]; then
    step "2. with torch.compile: ours (compile) and eager, bf16, 128 tokens, no transformers"
    run_to 120 "$D/decode_b1_compile.log" $PY bench_decode.py --ckpt $SMOL --device cuda --dtype bf16 \
      --max-new 128 --engines eager,compile --no-hf --out "$D/decode_b1_compile.json"
    grep -E "^\||^NVIDIA|rror" "$D/decode_b1_compile.log"
    step "1. training cost with torch.compile (SDPA, fixed k, then k drawn)"
    for flags in "--fixed-k --compile" "--compile"; do
      echo "--- $flags"
      run_to 150 "$D/train_cost_compile${flags// /}.log" $PY bench_train.py --init $SMOL \
        --data $GSMDATA $TRAIN --device cuda $flags
      grep -E "^\||MTP / NTP|^\{|rror" "$D/train_cost_compile${flags// /}.log"
    done
  fi
  step "extra done"
  exit 0
fi

[ "$part" = default ] || { echo "unknown part $part: stash | smol | extra | default"; exit 2; }
step "three trainings at once: default at $S3000 steps (bf16), default and --prefix-loss at $S800 (fp32)"
timeout $(lim 240) $PY distill.py --k 4 --steps $S3000 --cooldown $((S3000 / 2)) --device $DEV \
  --out runs/d3000 --overwrite --save-every 1000 $SMALL > "$D/train_d3000.log" 2>&1 & pids="$!"
timeout $(lim 240) $PY distill.py --k 4 --steps $S800 --device $DEV --precision fp32 --threads 1 \
  --out runs/d800 --overwrite $SMALL > "$D/train_d800.log" 2>&1 & pids="$pids $!"
timeout $(lim 240) $PY distill.py --k 4 --steps $S800 --device $DEV --precision fp32 --threads 1 \
  --prefix-loss --out runs/p800 --overwrite $SMALL > "$D/train_p800.log" 2>&1 & pids="$pids $!"
wait $pids       # (a bare wait would also wait for the tee that logs this script)
tail -n 2 "$D"/train_*.log
pids=""
step "benches: $LIMIT held-out problems, batch $BATCH, fp32"
for r in d3000 d800 p800; do
  timeout $(lim 200) $PY bench.py --ckpt runs/$r/ckpt --data synthetic --limit $LIMIT --batch $BATCH \
    --device $DEV --static 1 --taus 0.95,0.9 --lean $BNEW --out "$D/bench_$r" > "$D/bench_$r.log" 2>&1 &
  pids="$pids $!"
done
wait $pids
for r in d3000 d800 p800; do echo "--- $r"; grep -E "^\| |error|warning" "$D/bench_$r.log"; done
cp -r runs/d3000/log.jsonl "$D/d3000_log.jsonl"
tar czf "$OUT/students.tgz" --exclude train_state.pt runs/d3000/ckpt runs/d800/ckpt runs/p800/ckpt
step "default done"
