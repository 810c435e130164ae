#!/usr/bin/env bash
# The transformers provider on a GPU (device=cuda, bf16): tune SmolLM2-135M on the prepared SQuAD subset of
# experiments/squad_smollm2.yaml and print wall time, F1 base vs tuned (paired bootstrap) and GPU memory.
#
# Written for a bare GPU machine that has torch/transformers/peft but no network, reached through a transfer
# limit smaller than the 98 MB GGUF: the carried folder CARRY holds the weights in two parts (smol.part0 and
# smol.part1, sent in two calls), the missing wheels (whl/: trl, datasets, gguf, dill, multiprocess), the
# prepared data (prepared/) and a copy of this project (src/).
#   scripts/gpu_check.sh park CARRY   # first call: keep part 0 on the machine, print what it has
#   scripts/gpu_check.sh tune CARRY   # second call: join the parts, install the wheels, tune and score
set -u
CARRY=$(cd "${2:-.hfgpu}" && pwd)
OUT=${OUT:-/tmp/out}
GGUF=/root/SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
park)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, transformers, peft, accelerate, pyarrow, huggingface_hub as h; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available(), transformers.__version__, peft.__version__, accelerate.__version__, pyarrow.__version__, h.__version__)"
  for m in trl datasets gguf; do python3 -c "import $m; print('$m', $m.__version__)" 2>&1 | tail -1; done
  cp "$CARRY/smol.part0" /root/smol.part0 && ls -la /root/smol.part0 ;;
tune)
  cat /root/smol.part0 "$CARRY/smol.part1" > "$GGUF" && sha256sum "$GGUF"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$CARRY"/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$CARRY/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  cd "$CARRY/src" || exit 1
  /usr/bin/time -v python3 scripts/tune_direct.py --prepared "$CARRY/prepared" --base-model "$GGUF" \
    --set transformers.device=cuda --set transformers.precision=bf16 --set transformers.jobs_dir=/tmp/hfjobs \
    > "$OUT/tune.json" 2> "$OUT/tune.err"
  echo "exit $?"; cat "$OUT/tune.json"; grep -E "Maximum resident|Elapsed" "$OUT/tune.err"
  tail -5 "$OUT/tune.err"
  cp /tmp/hfjobs/*/trainer.log /tmp/hfjobs/*/events.jsonl "$OUT/" 2>/dev/null
  nvidia-smi --query-gpu=name,memory.used --format=csv ;;
*) echo "usage: $0 park|tune CARRY" >&2; exit 2 ;;
esac
