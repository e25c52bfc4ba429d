#!/usr/bin/env bash
# CPU quickstart (about 10 minutes on 2 cores, no download, no GPU):
#   demo corpus -> tokenizer -> indexed datasets -> small teacher (cpt) -> smaller student, pre-trained
#   briefly (cpt) then distilled with DDK
# ends with a per-domain table (teacher ppl, student ppl before/after, ratio, final weight) and a plot.
#   make quickstart            # or: PYTHON=.venv/bin/python bash examples/quickstart/run_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-quickstart_out}
NPROC=${NPROC:-1}                      # torchrun processes (e.g. NPROC=2 with TP=2 or DP=2)
TEACHER_ITERS=${TEACHER_ITERS:-300}
STUDENT_PRETRAIN_ITERS=${STUDENT_PRETRAIN_ITERS:-100}
STUDENT_ITERS=${STUDENT_ITERS:-300}
DDK_INTERVAL=${DDK_INTERVAL:-50}
SIZE_MB=${SIZE_MB:-3}                  # demo corpus size
VAL_SAMPLES=${VAL_SAMPLES:-64}         # validation samples per domain (--ddk-val-samples)
WARMUP=${WARMUP:-20}                   # --lr-warmup-iters
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONWARNINGS=ignore
run() { echo "+ $*" >&2; "$@"; }
torchrun_() { run "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$@"; }

mkdir -p "$OUT"
step() { printf '\n==== %s ====\n' "$*"; }

step "1/6 demo corpus (stdlib sources, prose, arithmetic, records)"
[ -f "$OUT/corpus/domains.yaml" ] || run "$PYTHON" tools/make_demo_corpus.py --output-dir "$OUT/corpus" --size-mb "$SIZE_MB" --seed 1234
DOMAINS=$("$PYTHON" -c "import yaml,sys; print(' '.join(d['name'] for d in yaml.safe_load(open(sys.argv[1]))['domains']))" "$OUT/corpus/domains.yaml")

step "2/6 SentencePiece tokenizer"
[ -f "$OUT/tokenizer.model" ] || run "$PYTHON" tools/train_tokenizer.py --input $(for d in $DOMAINS; do echo "$OUT/corpus/$d.jsonl"; done) \
    --output-prefix "$OUT/tokenizer" --vocab-size 4096 --model-type bpe --num-threads 2

step "3/6 JSONL -> Megatron .bin/.idx, one dataset per domain"
for d in $DOMAINS; do
  [ -f "$OUT/corpus/${d}_text_document.idx" ] || run "$PYTHON" tools/preprocess_data.py --input "$OUT/corpus/$d.jsonl" \
      --output-prefix "$OUT/corpus/$d" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
      --append-eod --workers 2
done

DATA=(--tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" --domains "$OUT/corpus/domains.yaml"
      --data-cache-path "$OUT/cache" --seq-length 128)
COMMON=(--swiglu --disable-bias-linear --untie-embeddings-and-output-weights --normalization RMSNorm
        --position-embedding-type rope --micro-batch-size 8 --global-batch-size 16 --log-interval 25 --seed 1234)

step "4/6 teacher: 4 layers, hidden 256 (--ddk-mode cpt)"
torchrun_ pretrain_ddk.py --ddk-mode cpt "${DATA[@]}" "${COMMON[@]}" \
    --num-layers 4 --hidden-size 256 --num-attention-heads 8 --num-query-groups 4 --ffn-hidden-size 704 \
    --train-iters "$TEACHER_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters "$WARMUP" --ddk-val-samples "$VAL_SAMPLES" \
    --save "$OUT/teacher" --load "$OUT/teacher"

STUDENT=(--num-layers 2 --hidden-size 128 --num-attention-heads 4 --num-query-groups 2 --ffn-hidden-size 352)

step "5/6 student: 2 layers, hidden 128 -- briefly pre-trained (cpt), then distilled with DDK (K=$DDK_INTERVAL, alpha=0.5, gamma=0.2)"
# The paper distils into an already pre-trained small model; a random-init student would have
# perplexity ratios in the thousands, which Eq. 1 turns into a one-hot mixture.
torchrun_ pretrain_ddk.py --ddk-mode cpt "${DATA[@]}" "${COMMON[@]}" "${STUDENT[@]}" \
    --train-iters "$STUDENT_PRETRAIN_ITERS" --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters "$WARMUP" \
    --ddk-val-samples "$VAL_SAMPLES" --save "$OUT/student_init" --load "$OUT/student_init"
if [ -f "$OUT/student/latest_checkpointed_iteration.txt" ]; then
  START=(--load "$OUT/student")                          # resume the DDK run
else
  START=(--load "$OUT/student_init" --finetune)          # weights only: DDK starts at iteration 0
fi
torchrun_ pretrain_ddk.py --ddk-mode ddk --teacher-load "$OUT/teacher" "${DATA[@]}" "${COMMON[@]}" "${STUDENT[@]}" \
    --train-iters "$STUDENT_ITERS" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters "$WARMUP" \
    --ddk-interval "$DDK_INTERVAL" --ddk-alpha 0.5 --kd-weight 0.2 --ddk-val-samples "$VAL_SAMPLES" \
    "${START[@]}" --save "$OUT/student" --tensorboard-dir "$OUT/tensorboard"

step "6/6 plot of the domain weights and perplexity ratios"
run "$PYTHON" tools/plot_ddk.py "$OUT/student/ddk_log.jsonl" --output "$OUT/ddk.png"
echo "done: $OUT/ddk.png, $OUT/student/ddk_log.jsonl, TensorBoard in $OUT/tensorboard"
