#!/usr/bin/env bash
# CPU quickstart (about 10 minutes on 2 cores, no download, no GPU):
#   demo corpus -> tokenizer -> indexed datasets -> small teacher (cpt) -> smaller student, pre-trained
#   briefly (cpt) then distilled twice from the same start: DDK (--ddk-mixing $MIXING) and plain KD on
#   equal sampling (the paper's "ES" baseline)
# ends with both students side by side per domain on held-out test documents (tools/evaluate.py) and a plot.
#   make quickstart            # or: PYTHON=.venv/bin/python bash examples/quickstart/run_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-quickstart_out}
NPROC=${NPROC:-1}                      # torchrun processes (e.g. NPROC=2 with TP=2 or DP=2)
TEACHER_ITERS=${TEACHER_ITERS:-300}
STUDENT_PRETRAIN_ITERS=${STUDENT_PRETRAIN_ITERS:-100}
STUDENT_ITERS=${STUDENT_ITERS:-200}    # per student: DDK, then KD
DDK_INTERVAL=${DDK_INTERVAL:-25}
MIXING=${MIXING:-ddk-log}             # --ddk-mixing of the DDK student (docs/DDK.md); ddk = the paper's exact update
TEMPERATURE=${TEMPERATURE:-0.5}        # --ddk-temperature: ddk-log weights proportional to ratio^(1/T) (docs/DDK.md)
SIZE_MB=${SIZE_MB:-3}                  # demo corpus size
VAL_SAMPLES=${VAL_SAMPLES:-256}        # validation samples per domain (--ddk-val-samples; capped at each validation set)
WARMUP=${WARMUP:-20}                   # --lr-warmup-iters
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
run() { echo "+ $*" >&2; "$@"; }
torchrun_() { run "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$@"; }

mkdir -p "$OUT"
step() { printf '\n==== %s ====\n' "$*"; }

step "1/7 demo corpus (stdlib sources, prose, arithmetic, records; 5% of the documents held out as test)"
[ -f "$OUT/corpus/domains.yaml" ] || run "$PYTHON" tools/make_demo_corpus.py --output-dir "$OUT/corpus" --size-mb "$SIZE_MB" --seed 1234 \
    --test-fraction 0.05
DOMAINS=$("$PYTHON" -c "import yaml,sys; print(' '.join(d['name'] for d in yaml.safe_load(open(sys.argv[1]))['domains']))" "$OUT/corpus/domains.yaml")

step "2/7 SentencePiece tokenizer"
[ -f "$OUT/tokenizer.model" ] || run "$PYTHON" tools/train_tokenizer.py --input $(for d in $DOMAINS; do echo "$OUT/corpus/$d.jsonl"; done) \
    --output-prefix "$OUT/tokenizer" --vocab-size 4096 --model-type bpe --num-threads 2

step "3/7 JSONL -> Megatron .bin/.idx, one dataset per domain"
for d in $DOMAINS; do
  [ -f "$OUT/corpus/${d}_text_document.idx" ] || run "$PYTHON" tools/preprocess_data.py --input "$OUT/corpus/$d.jsonl" \
      --output-prefix "$OUT/corpus/$d" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
      --append-eod --workers 2
done

DATA=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" --domains "$OUT/corpus/domains.yaml"
      --data-cache-path "$OUT/cache" --seq-length 128)
COMMON=(--swiglu --disable-bias-linear --untie-embeddings-and-output-weights --normalization RMSNorm
        --position-embedding-type rope --micro-batch-size 8 --global-batch-size 16 --log-interval 25 --seed 1234)

step "4/7 teacher: 4 layers, hidden 256 (--ddk-mode cpt)"
torchrun_ pretrain_ddk.py --ddk-mode cpt "${DATA[@]}" "${COMMON[@]}" \
    --num-layers 4 --hidden-size 256 --num-attention-heads 8 --num-query-groups 4 --ffn-hidden-size 704 \
    --train-iters "$TEACHER_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters "$WARMUP" --ddk-val-samples "$VAL_SAMPLES" \
    --save "$OUT/teacher" --load "$OUT/teacher"

STUDENT=(--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --ffn-hidden-size 176)

step "5/7 student: 2 layers, hidden 64 -- briefly pre-trained (cpt), then distilled with DDK (--ddk-mixing $MIXING, T=$TEMPERATURE, K=$DDK_INTERVAL, alpha=0.5, gamma=0.2)"
# The paper distils into an already pre-trained small model; a random-init student would have
# perplexity ratios in the thousands, which Eq. 1 turns into a one-hot mixture.
torchrun_ pretrain_ddk.py --ddk-mode cpt "${DATA[@]}" "${COMMON[@]}" "${STUDENT[@]}" \
    --train-iters "$STUDENT_PRETRAIN_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters "$WARMUP" \
    --ddk-val-samples "$VAL_SAMPLES" --save "$OUT/student_init" --load "$OUT/student_init"
start() {  # START: resume the run saved in $1, or start it from the pre-trained student's weights (iteration 0)
  if [ -f "$1/latest_checkpointed_iteration.txt" ]; then START=(--load "$1"); else START=(--load "$OUT/student_init" --finetune); fi
}
DISTILL=(--teacher-load "$OUT/teacher" "${DATA[@]}" "${COMMON[@]}" "${STUDENT[@]}" --train-iters "$STUDENT_ITERS"
         --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters "$WARMUP" --kd-weight 0.2 --ddk-val-samples "$VAL_SAMPLES")
start "$OUT/student"
torchrun_ pretrain_ddk.py --ddk-mode ddk --ddk-mixing "$MIXING" --ddk-temperature "$TEMPERATURE" --ddk-interval "$DDK_INTERVAL" --ddk-alpha 0.5 \
    "${DISTILL[@]}" "${START[@]}" --save "$OUT/student" --tensorboard-dir "$OUT/tensorboard"

step "6/7 the same student distilled with plain KD on equal sampling (the paper's ES baseline), same cost"
start "$OUT/student_kd"
torchrun_ pretrain_ddk.py --ddk-mode kd "${DISTILL[@]}" "${START[@]}" --save "$OUT/student_kd"  # registry weights: equal

step "7/7 DDK vs KD on the held-out test documents, and the plot of the domain weights"
torchrun_ tools/evaluate.py --load "$OUT/student" "$OUT/student_kd" --teacher-load "$OUT/teacher" \
    --domains "$OUT/corpus/domains.yaml" --split test --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$OUT/tokenizer.model" --seq-length 128 --data-cache-path "$OUT/cache" --output "$OUT/test_eval.json"
run "$PYTHON" tools/plot_ddk.py "$OUT/student/ddk_log.jsonl" --output "$OUT/ddk.png"
echo "done: $OUT/test_eval.json, $OUT/ddk.png, $OUT/student/ddk_log.jsonl, TensorBoard in $OUT/tensorboard"
