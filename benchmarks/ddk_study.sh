#!/usr/bin/env bash
# The DDK-vs-KD study recorded in docs/DDK.md, from nothing: a real local corpus, its tokenizer, the
# teacher (two stages), the "near" and "far" students, then benchmarks/ddk_ablation.py in both regimes,
# short (48 iterations, K = 6) and long (240 iterations, K = 30). Every stage is skipped when its output
# exists, so a killed study resumes where it stopped (ddk_ablation.py also skips finished runs).
#
#   bash benchmarks/ddk_study.sh                          # everything (~2-3 h on 2 idle CPU cores)
#   STAGES="prepare short" bash benchmarks/ddk_study.sh   # only some stages: prepare short long
#   OUT=/data/ddk_study PYTHON=.venv/bin/python JOBS=2 bash benchmarks/ddk_study.sh
#
# The corpus is text shipped with a Debian machine and CPython (tools/make_local_corpus.py): another
# machine image gives other documents, so expect the same picture, not the same digits.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-ddk_study}
JOBS=${JOBS:-2}                        # ablation runs in parallel
SEEDS=${SEEDS:-"1234 1235 1236"}
STAGES=${STAGES:-"prepare short long"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONWARNINGS=ignore
run() { echo "+ $*" >&2; "$@"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
torchrun_() { run "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 "$@"; }
C="$OUT/corpus"
DATA=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$C/tok.model" --data-cache-path "$OUT/cache" --seq-length 128)
COMMON=(--swiglu --disable-bias-linear --untie-embeddings-and-output-weights --normalization RMSNorm
        --position-embedding-type rope --micro-batch-size 16 --global-batch-size 16 --log-interval 20 --ddk-val-samples 64)
TEACHER=(--num-layers 3 --hidden-size 128 --num-attention-heads 4 --num-query-groups 2 --ffn-hidden-size 352)
STUDENT=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --ffn-hidden-size 176)
done_() { [ -f "$1/latest_checkpointed_iteration.txt" ]; }

# registry with the corpus's splits and other sampling weights (the students' skewed pre-training)
reweighted() {  # reweighted OUTPUT w1 w2 w3 w4
  "$PYTHON" - "$C/domains.yaml" "$@" <<'EOF'
import sys, yaml
source, output, *weights = sys.argv[1:]
registry = yaml.safe_load(open(source))
base = __import__("os").path.dirname(__import__("os").path.abspath(source))
for domain, weight in zip(registry["domains"], weights, strict=True):
    for split in ("train", "valid", "test"):
        domain[split] = __import__("os").path.join(base, domain[split])
    domain["weight"] = float(weight)
open(output, "w").write(yaml.safe_dump(registry, sort_keys=False))
EOF
}

if has prepare; then
  [ -f "$C/domains.yaml" ] || run "$PYTHON" tools/make_local_corpus.py --output-dir "$C" --size-mb 4 --seed 1234
  names=$("$PYTHON" -c "import yaml,sys; print(' '.join(d['name'] for d in yaml.safe_load(open(sys.argv[1]))['domains']))" "$C/domains.yaml")
  [ -f "$C/tok.model" ] || run "$PYTHON" tools/train_tokenizer.py --input $(for d in $names; do echo "$C/${d}_train.jsonl"; done) \
      --output-prefix "$C/tok" --vocab-size 4096 --model-type bpe --num-threads 2
  for d in $names; do for s in train valid test; do
    [ -f "$C/${d}_${s}_text_document.idx" ] || run "$PYTHON" tools/preprocess_data.py --input "$C/${d}_${s}.jsonl" \
        --output-prefix "$C/${d}_${s}" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$C/tok.model" \
        --append-eod --workers 2
  done; done
  # teacher: 200 iterations of CPT on the natural (equal) mixture, then 300 more at a lower LR, another seed
  done_ "$OUT/teacher_200it" || torchrun_ pretrain_ddk.py --ddk-mode cpt "${DATA[@]}" --domains "$C/domains.yaml" "${COMMON[@]}" \
      "${TEACHER[@]}" --seed 1234 --train-iters 200 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 30 \
      --save "$OUT/teacher_200it" --load "$OUT/teacher_200it"
  done_ "$OUT/teacher" || torchrun_ pretrain_ddk.py --ddk-mode cpt "${DATA[@]}" --domains "$C/domains.yaml" "${COMMON[@]}" \
      "${TEACHER[@]}" --seed 4321 --train-iters 300 --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 10 \
      --load "$OUT/teacher_200it" --finetune --save "$OUT/teacher"
  # students: how long and how skewed their pre-training is sets how far behind the teacher they start
  reweighted "$OUT/near_domains.yaml" 0.3 0.3 0.2 0.2
  reweighted "$OUT/far_domains.yaml" 0.4 0.4 0.1 0.1
  done_ "$OUT/student_near" || torchrun_ pretrain_ddk.py --ddk-mode cpt "${DATA[@]}" --domains "$OUT/near_domains.yaml" "${COMMON[@]}" \
      "${STUDENT[@]}" --seed 1234 --train-iters 300 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 \
      --save "$OUT/student_near" --load "$OUT/student_near"
  done_ "$OUT/student_far" || torchrun_ pretrain_ddk.py --ddk-mode cpt "${DATA[@]}" --domains "$OUT/far_domains.yaml" "${COMMON[@]}" \
      "${STUDENT[@]}" --seed 1234 --train-iters 200 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 10 \
      --save "$OUT/student_far" --load "$OUT/student_far"
fi

ablation() {  # ablation REGIME NAME ITERS K METHODS...
  local regime=$1 name=$2 iters=$3 k=$4; shift 4
  run "$PYTHON" benchmarks/ddk_ablation.py --domains "$C/domains.yaml" --tokenizer-model "$C/tok.model" \
      --output-dir "$OUT/ablation_$name" --teacher-load "$OUT/teacher" --student-load "$OUT/student_$regime" \
      --methods "$@" --seeds $SEEDS --train-iters "$iters" --ddk-interval "$k" --seq-length 64 --jobs "$JOBS" \
      --test-samples 128
}
# the method lists of the recorded tables (docs/DDK.md); NAME@K=..,alpha=..,val=..,signal=.. overrides one setting
NEAR_SHORT=(kd-equal ddk ddk-robust ddk-no-smoothing hindsight:ddk-robust ddk-log hindsight:ddk-log
  ddk-log@signal=kd-gap hindsight:ddk-log@signal=kd-gap kd-natural cpt-equal cpt-natural
  ddk@K=3 ddk-no-smoothing@K=3 ddk@K=12 ddk-no-smoothing@K=12 ddk@alpha=0.8 ddk@alpha=0.2
  ddk-log@K=3 ddk-log@K=12 ddk-log@alpha=0.8 ddk-log@alpha=0.2
  ddk@val=8 ddk-no-smoothing@val=8 ddk-log@val=8 ddk@val=256 ddk-no-smoothing@val=256 ddk-log@val=256
  ddk-log@tau=0.5 ddk-log@tau=0.5,val=256 hindsight:ddk-log@tau=0.5,val=256 ddk-log@signal=kd-gap,val=256)
FAR_SHORT=(kd-equal ddk ddk-robust ddk-no-smoothing hindsight:ddk-robust ddk-log hindsight:ddk-log
  ddk-log@signal=kd-gap hindsight:ddk-log@signal=kd-gap ddk-smooth0 ddk-bounded hindsight:ddk
  cpt-natural cpt-equal kd-natural ddk@K=3 ddk-no-smoothing@K=3 ddk@K=12 ddk-log@K=3 ddk-log@K=12
  ddk-log@alpha=0.8 ddk-log@alpha=0.2 ddk@alpha=0.8 ddk@alpha=0.2 ddk@val=256 ddk-no-smoothing@val=256 ddk-log@val=256
  ddk-log@tau=0.5 ddk-log@tau=0.5,val=256 hindsight:ddk-log@tau=0.5,val=256 ddk-log@signal=kd-gap,val=256)
NEAR_LONG=(kd-equal ddk-log ddk ddk-no-smoothing hindsight:ddk-log ddk-log@signal=kd-gap hindsight:ddk-log@signal=kd-gap
  ddk@val=256 ddk-no-smoothing@val=256 ddk-log@val=256 ddk-log@tau=0.5,val=256 hindsight:ddk-log@tau=0.5,val=256)
FAR_LONG=(kd-equal ddk-log ddk hindsight:ddk-log ddk-log@signal=kd-gap hindsight:ddk-log@signal=kd-gap ddk-no-smoothing cpt-equal
  ddk@val=256 ddk-no-smoothing@val=256 ddk-log@val=256 ddk-log@tau=0.5,val=256 hindsight:ddk-log@tau=0.5,val=256)
if has short; then
  ablation near near 48 6 "${NEAR_SHORT[@]}"
  ablation far far 48 6 "${FAR_SHORT[@]}"
fi
if has long; then
  ablation far far_long 240 30 "${FAR_LONG[@]}"
  ablation near near_long 240 30 "${NEAR_LONG[@]}"
fi
# the compact table of docs/DDK.md: every method's seed-paired gain over kd-equal, one column per study
columns=()
for study in "near, short=near" "far, short=far" "near, long=near_long" "far, long=far_long"; do
  [ -f "$OUT/ablation_${study#*=}/summary.json" ] && columns+=("${study%%=*}=$OUT/ablation_${study#*=}")
done
if [ ${#columns[@]} -gt 0 ]; then
  run "$PYTHON" benchmarks/ddk_study_table.py "${columns[@]}" | tee "$OUT/study_table.md"
fi
