# Shared by the examples/slurm/*.sbatch scripts (sourced, not run): checks, resume logic, launch.
#
# Each sbatch script sets the model / layout variables and the PRETRAIN_ARGS array, then calls
#   ddk_check_layout; ddk_resume_args; ddk_launch
# DRY_RUN=1 prints the exact launch line and exits 0 without srun or scontrol (works off-cluster).
# Teacher cache (docs/TEACHER_CACHE.md): STAGE=cache runs tools/cache_teacher_logits.py instead, with the
# script's data, layout and run configuration (what the run can draw), into TEACHER_CACHE (default
# ${CKPT_DIR}_teacher_cache_k${TOP_K}_s$TAIL_SAMPLES: the top TOP_K (24) tokens and TAIL_SAMPLES (8) drawn
# from the tail per position; TAIL_SAMPLES=0: ..._k$TOP_K, top-k only); TEACHER_CACHE=DIR then trains from
# it without loading the teacher
# (TEACHER_FALLBACK=1 also passes --teacher-load for samples the cache lacks).

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

ddk_die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 1
}

ddk_warn() {
  echo "$(basename "$0"): warning: $*" >&2
}

# The layout must divide the models and the GPUs; fail here, not 10 minutes into a queued job.
ddk_check_layout() {
  local world=$((NNODES * GPUS_PER_NODE)) problems=()
  [ $((GPUS_PER_NODE % TP)) -eq 0 ] ||
    problems+=("TP=$TP does not divide GPUS_PER_NODE=$GPUS_PER_NODE (tensor parallelism stays inside a node)")
  [ $((world % (TP * PP))) -eq 0 ] ||
    problems+=("TP=$TP x PP=$PP does not divide the $world GPUs ($NNODES nodes x $GPUS_PER_NODE)")
  [ $((STUDENT_LAYERS % PP)) -eq 0 ] || problems+=("PP=$PP does not divide the student's $STUDENT_LAYERS layers")
  [ $((TEACHER_LAYERS % PP)) -eq 0 ] || problems+=("PP=$PP does not divide the teacher's $TEACHER_LAYERS layers")
  if [ ${#problems[@]} -eq 0 ]; then
    DP=$((world / (TP * PP)))
    [ $((DP % ${EP:-1})) -eq 0 ] ||
      problems+=("EP=${EP:-1} does not divide DP=$DP (expert parallelism is carved out of data parallelism)")
    [ $((GLOBAL_BATCH % (MICRO_BATCH * DP))) -eq 0 ] ||
      problems+=("GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of MICRO_BATCH=$MICRO_BATCH x DP=$DP")
  fi
  if [ ${#problems[@]} -gt 0 ]; then
    printf '%s\n' "${problems[@]}" >&2
    ddk_die "fix TP / PP / MICRO_BATCH / GLOBAL_BATCH or the node count (see tools/estimate_memory.py --sweep)"
  fi
  local missing=()
  [ -e "$DOMAINS" ] || missing+=("DOMAINS=$DOMAINS (domain registry, docs/DATA.md)")
  [ -e "$TOKENIZER" ] || missing+=("TOKENIZER=$TOKENIZER (tokenizer.json or its directory)")
  if [ "$DDK_MODE" != cpt ] && [ ! -e "$TEACHER_CKPT" ] &&
      { [ -z "${TEACHER_CACHE:-}" ] || [ -n "${TEACHER_FALLBACK:-}" ] || [ "${STAGE:-train}" = cache ]; }; then
    missing+=("TEACHER_CKPT=$TEACHER_CKPT (tools/convert_hf_to_megatron.py output)")
  fi
  if [ -n "$STUDENT_CKPT" ] && [ ! -e "$STUDENT_CKPT" ] && [ ! -f "$CKPT_DIR/latest_checkpointed_iteration.txt" ]; then
    missing+=("STUDENT_CKPT=$STUDENT_CKPT (set STUDENT_CKPT= to start from random weights)")
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    if [ -n "${DRY_RUN:-}" ]; then
      for m in "${missing[@]}"; do ddk_warn "not found: $m"; done
    else
      printf 'not found: %s\n' "${missing[@]}" >&2
      ddk_die "set the variables above to existing paths"
    fi
  fi
}

# Resume: CKPT_DIR is both --save and --load, so a requeued job continues from its latest checkpoint.
# The first launch (no checkpoint there yet) starts from the converted student with --finetune
# (weights only: iteration, optimizer and data start fresh), or from random weights without STUDENT_CKPT.
ddk_resume_args() {
  if [ -f "$CKPT_DIR/latest_checkpointed_iteration.txt" ]; then
    LOAD_ARGS=(--load "$CKPT_DIR")
  elif [ -n "$STUDENT_CKPT" ]; then
    LOAD_ARGS=(--load "$STUDENT_CKPT" --finetune)
  else
    LOAD_ARGS=(--load "$CKPT_DIR")
  fi
  if [ "$DDK_MODE" != cpt ] && [ -n "${TEACHER_CACHE:-}" ] && [ "${STAGE:-train}" != cache ]; then
    TEACHER_ARGS=(--teacher-cache "$TEACHER_CACHE")
    [ -z "${TEACHER_FALLBACK:-}" ] || TEACHER_ARGS+=(--teacher-load "$TEACHER_CKPT")
  elif [ "$DDK_MODE" != cpt ]; then
    TEACHER_ARGS=(--teacher-load "$TEACHER_CKPT")
  else
    TEACHER_ARGS=()
  fi
}

# The value of flag $1 in PRETRAIN_ARGS.
ddk_flag() {
  local i
  for ((i = 0; i < ${#PRETRAIN_ARGS[@]} - 1; i++)); do
    if [ "${PRETRAIN_ARGS[$i]}" = "$1" ]; then
      echo "${PRETRAIN_ARGS[$((i + 1))]}"
      return
    fi
  done
}

# STAGE=cache: the entry becomes the cache tool, its flags derived from the training flags.
ddk_cache_stage() {
  ENTRY=$REPO_DIR/pretrain_ddk.py
  [ "${STAGE:-train}" = cache ] || return 0
  [ "$DDK_MODE" != cpt ] || ddk_die "STAGE=cache: DDK_MODE=cpt trains without a teacher, there is nothing to cache"
  ENTRY=$REPO_DIR/tools/cache_teacher_logits.py
  local top_k=${TOP_K:-24} tail=${TAIL_SAMPLES:-8} flag
  local name=k$top_k
  [ "$tail" = 0 ] || name+=_s$tail
  local args=(--output "${TEACHER_CACHE:-${CKPT_DIR}_teacher_cache_$name}" --teacher-load "$TEACHER_CKPT")
  for flag in --tokenizer-type --tokenizer-model --domains --data-cache-path --seq-length --seed --kd-temperature \
      --train-iters --global-batch-size --ddk-interval --ddk-mode --ddk-mixing --ddk-alpha \
      --tensor-model-parallel-size --pipeline-model-parallel-size; do
    args+=("$flag" "$(ddk_flag "$flag")")
  done
  args+=(--val-samples "$(ddk_flag --ddk-val-samples)" --top-k "$top_k" --tail-samples "$tail"
    --micro-batch-size "${CACHE_MICRO_BATCH:-4}"
    --bf16 --no-progress)
  [ -z "${FP8:-}" ] || args+=(--fp8-format "$FP8")
  PRETRAIN_ARGS=("${args[@]}")
}

# srun (one task per node) -> torchrun (one process per GPU) -> pretrain_ddk.py (or the cache tool).
ddk_launch() {
  local master_addr job_id
  ddk_cache_stage
  if [ -n "${DRY_RUN:-}" ]; then
    master_addr=${MASTER_ADDR:-localhost}
    job_id=${SLURM_JOB_ID:-dryrun}
  else
    [ -n "${SLURM_JOB_ID:-}" ] || ddk_die "not inside a SLURM job: submit with sbatch (or set DRY_RUN=1)"
    master_addr=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
    job_id=$SLURM_JOB_ID
  fi
  local launcher=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)
  if [ -n "$CONTAINER" ]; then  # pyxis/enroot; CONTAINER_MOUNTS must include the repo and the data
    launcher+=(--container-image="$CONTAINER" --container-workdir="$REPO_DIR")
    [ -z "$CONTAINER_MOUNTS" ] || launcher+=(--container-mounts="$CONTAINER_MOUNTS")
  fi
  # RDZV_JOIN_TIMEOUT (seconds, torchrun's default 600): how long the nodes wait for each other to join
  local rdzv_conf=()
  [ -z "${RDZV_JOIN_TIMEOUT:-}" ] || rdzv_conf=(--rdzv-conf "join_timeout=$RDZV_JOIN_TIMEOUT")
  LAUNCH=("${launcher[@]}" "$TORCHRUN"
    --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
    --rdzv-backend c10d --rdzv-endpoint "$master_addr:$MASTER_PORT" --rdzv-id "$job_id" "${rdzv_conf[@]}"
    "$ENTRY" "${PRETRAIN_ARGS[@]}")
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${LAUNCH[@]}"
    echo
    exit 0
  fi
  mkdir -p "$CKPT_DIR"
  echo "[$(date -Is)] job $job_id: $NNODES nodes x $GPUS_PER_NODE GPUs, TP=$TP PP=$PP DP=$DP, master $master_addr"
  echo "[$(date -Is)] ${LOAD_ARGS[*]}"
  echo "[$(date -Is)] rendezvous $master_addr:$MASTER_PORT: waiting up to ${RDZV_JOIN_TIMEOUT:-600} s for all $NNODES nodes"
  # --signal=B:USR1@... reaches this shell shortly before the time limit: requeue, and the next run
  # resumes from the latest checkpoint in CKPT_DIR (work since the last --save-interval is redone).
  trap 'echo "[$(date -Is)] time limit near: requeueing job $SLURM_JOB_ID"; scontrol requeue "$SLURM_JOB_ID"' USR1
  "${LAUNCH[@]}" &
  local pid=$!
  local status=0
  wait "$pid" || status=$?
  # wait returns early (status > 128) when the trap fires; let srun finish its teardown.
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || status=$?; done
  if [ "$status" -ne 0 ]; then
    ddk_warn "job $job_id: the launch failed with exit status $status; a RendezvousTimeoutError above means" \
      "not all $NNODES nodes reached $master_addr:$MASTER_PORT within ${RDZV_JOIN_TIMEOUT:-600} s" \
      "(RDZV_JOIN_TIMEOUT): check that every node started (its SLURM log) and can reach that address"
  fi
  exit "$status"
}
