#!/usr/bin/env bash
# The GPU measurements (README, "On one H100"), in two parts, each one call of a lent GPU machine:
#
#   bash gpu_run.sh part1   # CUDA tests; the embedded default at 3000 steps (bf16) and the
#                           # default recipe's students (fp32 = the CPU's numerics), benched
#   bash gpu_run.sh part2   # SmolLM2-135M: convert the GGUF, training cost (bench_train.py),
#                           # batch-1 decoding vs transformers (bench_decode.py), a GSM8K
#                           # distillation and its bench, batch-1 and batch-16 decoding speed
#
# The SmolLM2 GGUF (98 MB) is more than one call may carry: part1 carries .gg1/ (its first half,
# and GSM8K under .gg1/cache for $MTP_CACHE), part2 carries .gg2/ (the second half) and joins
# them. Wheels the machine lacks (gguf) travel in .whl/. Every step has its own time limit, so a
# slow or failing step costs its slot, not the run; all output goes to $OUT (default gpu_out/).
# TINY=1 runs the same steps on the CPU at toy sizes (the embedded teacher stands in for SmolLM2).
set -u
part=${1:?usage: gpu_run.sh part1|part2}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT" runs
exec > >(tee -a "$OUT/$part.log") 2>&1
# a carried folder is gone at the next call: part1's half is kept in /tmp/gg1 (the stash command)
G1=$PWD/.gg1; [ -f "$G1/part1" ] || G1=/tmp/gg1
export PYTHONUNBUFFERED=1 MTP_CACHE=$G1/cache
PY=python3
T0=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
# a step's time limit: its own, or what is left of the part's budget (BUDGET s), at least 5 s
lim() { local left=$(( ${BUDGET:-570} - ($(date +%s) - T0) )); echo $(( $1 < left ? $1 : (left > 5 ? left : 5) )); }
if [ "${TINY:-0}" = 1 ]; then
  DEV=cpu; S3000=6; S800=6; LIMIT=4; BATCH=6; TRAIN_STEPS=3; SMOL_STEPS=4; GSM_LIMIT=8
  GSM_BATCH=4; NEW=24; SPEED_N=4; FMT=qa; GSMDATA=synthetic; SMALL="--micro-batch 4 --step-tokens 640"; BNEW="--max-new 12"; SEQ=64
else
  DEV=cuda; S3000=3000; S800=800; LIMIT=1000; BATCH=250; TRAIN_STEPS=10; SMOL_STEPS=2500
  GSM_LIMIT=500; GSM_BATCH=64; NEW=256; SPEED_N=16; FMT=chat; GSMDATA=gsm8k; SMALL=""; BNEW=""; SEQ=256
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

if [ "$part" = part1 ]; then
  step "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

  step "CUDA tests"
  timeout $(lim 150) $PY -m pytest -q -x tests/test_cuda.py 2>&1 | tail -15

  step "three trainings at once: default at $S3000 steps (bf16), default and --prefix-loss at $S800 (fp32)"
  timeout $(lim 240) $PY distill.py --k 4 --steps $S3000 --cooldown $((S3000 / 2)) --device $DEV \
    --out runs/d3000 --overwrite --save-every 1000 $SMALL > "$OUT/train_d3000.log" 2>&1 & pids="$!"
  timeout $(lim 240) $PY distill.py --k 4 --steps $S800 --device $DEV --precision fp32 --threads 1 \
    --out runs/d800 --overwrite $SMALL > "$OUT/train_d800.log" 2>&1 & pids="$pids $!"
  timeout $(lim 240) $PY distill.py --k 4 --steps $S800 --device $DEV --precision fp32 --threads 1 \
    --prefix-loss --out runs/p800 --overwrite $SMALL > "$OUT/train_p800.log" 2>&1 & pids="$pids $!"
  wait $pids       # (a bare wait would also wait for the tee that logs this script)
  tail -n 2 "$OUT"/train_*.log

  pids=""
  step "benches: $LIMIT held-out problems, batch $BATCH, fp32"
  for r in d3000 d800 p800; do
    timeout $(lim 200) $PY bench.py --ckpt runs/$r/ckpt --data synthetic --limit $LIMIT --batch $BATCH \
      --device $DEV --static 1 --taus 0.95,0.9 --lean $BNEW --out "runs/bench_$r" > "runs/bench_$r.log" 2>&1 &
    pids="$pids $!"
  done
  wait $pids
  for r in d3000 d800 p800; do echo "--- $r"; grep -E "^\| |error|warning" "runs/bench_$r.log"; done
  step "4. batch 16 on the default student (3000 steps), bf16, graphs"
  E1=graphs; [ "$DEV" = cpu ] && E1=static
  timeout $(lim 40) $PY bench.py --ckpt runs/d3000/ckpt --data synthetic --limit 64 --batch 16 \
    --device $DEV --dtype bf16 --engine $E1 --static 1 --taus 0.9 --lean $BNEW \
    --out runs/speed_d3000_b16 > runs/speed_d3000_b16.log 2>&1
  grep -E "^\| |error" runs/speed_d3000_b16.log
  tar czf "$OUT/benches1.tgz" runs/bench_* runs/speed_* runs/*/log.jsonl runs/*/args.json 2>/dev/null
  tar czf "$OUT/students.tgz" --exclude train_state.pt runs/d800/ckpt runs/p800/ckpt
  tar czf "$OUT/d3000.tgz" --exclude train_state.pt runs/d3000/ckpt
  ls -la "$OUT"
  step "part1 done"
  exit 0
fi

# ----------------------------------------------------------------------------- part2: SmolLM2
if [ "${TINY:-0}" = 1 ]; then
  SMOL=checkpoints/synth-teacher
else
  step "join and convert the GGUF"
  if [ ! -f "$G1/part1" ]; then echo "no $G1/part1: the machine is not the one part1 ran on"; exit 3; fi
  cat "$G1/part1" .gg2/part2 > /tmp/smol.gguf
  sha256sum /tmp/smol.gguf
  SMOL=checkpoints/smollm2-135m-instruct
  timeout $(lim 60) $PY convert_gguf.py /tmp/smol.gguf $SMOL | tail -4
fi
ENGINE=graphs
[ "$DEV" = cpu ] && ENGINE=static

step "2. batch-1 decoding, ours (eager / CUDA graphs / torch.compile) vs transformers generate, bf16"
timeout $(lim 100) $PY bench_decode.py --ckpt $SMOL --device $DEV --dtype bf16 --max-new $((NEW / 2)) \
  --engines eager,$ENGINE$([ "$DEV" = cuda ] && echo ,compile) --out "$OUT/decode_b1.json" \
  2>&1 | grep -v Warning
timeout $(lim 30) $PY bench_decode.py --ckpt $SMOL --device $DEV --dtype fp32 --max-new 64 --repeats 1 \
  --no-hf --engines eager,$ENGINE --out "$OUT/decode_b1_fp32.json" 2>&1 | grep -E "^\|"
if ! grep -q "\"run\": \"ours, $ENGINE\".*\"same_prefix\": 64" "$OUT/decode_b1_fp32.json" 2>/dev/null; then
  echo "!! the graphs engine did not reproduce eager in fp32: the benches below use eager"; ENGINE=eager
fi

step "1. training cost: MTP step vs NTP step, N=160, batch 64, k_max 16, bf16"
TB="$PY bench_train.py --init $SMOL --data $GSMDATA --seq-len 160 --batch 64 --k 16 --device $DEV --steps $TRAIN_STEPS"
[ "${TINY:-0}" = 1 ] && TB="$PY bench_train.py --init $SMOL --data $GSMDATA --seq-len 64 --batch 4 --k 4 --device cpu --steps $TRAIN_STEPS"
for v in "sdpa random k|" "sdpa fixed k|--fixed-k" "flex fixed k|--fixed-k --attention flex" \
         "sdpa fixed k compiled|--fixed-k --compile"; do
  name=${v%%|*}; flags=${v#*|}
  [ "$DEV" = cpu ] && [[ "$flags" == *flex* || "$flags" == *compile* ]] && continue
  echo "--- $name"
  timeout $(lim $(case $flags in *compile*) echo 75;; *flex*) echo 45;; *) echo 35;; esac)) $TB $flags 2>&1 \
    | grep -E "^\||MTP / NTP|^\{" | tee -a "$OUT/train_cost.txt"
done

step "5. distill SmolLM2 on GSM8K train ($SMOL_STEPS steps at most, batch 32, k_max 4, bf16)"
timeout $(lim 120) $PY distill.py --init $SMOL --data $GSMDATA --k 4 --out runs/smol --overwrite \
  --steps $SMOL_STEPS --seq-len $SEQ --micro-batch 32 --step-tokens $((32 * SEQ)) --lr 5e-5 --warmup 100 \
  --cooldown $((SMOL_STEPS / 3)) --log-every 100 --save-every 250 --device $DEV $SMALL > "$OUT/train_smol.log" 2>&1
echo "distill exit $?"; grep -E "^step|done|error" "$OUT/train_smol.log" | tail -n 8

step "5. bench the student: $GSM_LIMIT GSM8K test problems, batch $GSM_BATCH, fp32, every strategy"
timeout $(lim 110) $PY bench.py --ckpt runs/smol/ckpt --data $GSMDATA --format $FMT --limit $GSM_LIMIT \
  --batch $GSM_BATCH --max-new $NEW --device $DEV --dtype fp32 --static 1,2,3 \
  --taus 0.9,0.8 --teacher $SMOL --out runs/bench_smol > runs/bench_smol.log 2>&1
grep -E "^\| |error|warning" runs/bench_smol.log

step "3/4. speed on the student, bf16, $ENGINE: batch 1 ($SPEED_N problems) and batch 16 ($((4 * SPEED_N)))"
for b in 1 16; do
  n=$([ $b = 1 ] && echo $SPEED_N || echo $((4 * SPEED_N)))
  timeout $(lim 30) $PY bench.py --ckpt runs/smol/ckpt --data $GSMDATA --format $FMT --limit $n \
    --batch $b --max-new 128 --device $DEV --dtype bf16 --engine $ENGINE --static 1 --taus 0.9 \
    --lean --out runs/speed_smol_b$b > runs/speed_smol_b$b.log 2>&1
  grep -E "^\| |error" runs/speed_smol_b$b.log
done
tar czf "$OUT/benches2.tgz" runs/bench_smol* runs/speed_smol* runs/smol/log.jsonl 2>/dev/null
ls -la "$OUT"
step "part2 done"
