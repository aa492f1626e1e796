#!/usr/bin/env bash
# The GPU check of issue 6 (bench/gpu_check.py), a few minutes on one CUDA GPU. Writes
# bench/results/<date>-gpu-check-<host>.{json,md}, and copies them to $OUT when that is set.
#
# On the device machine of this workplace (torch, transformers, peft, safetensors and tqdm are there; cachetools
# is not): once, here, `echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude`,
# `python3 -m pip download --no-deps --only-binary=:all: -d .whl cachetools` and
# `mkdir -p .gpu && cp ~/.cache/lora-mux/smollm2-135m-instruct/tokenizer* .gpu/` (after one `mux serve` or
# `python -c "from mux.model.loader import default_model_dir; default_model_dir()"` made that cache);
# then run `bash bench/gpu_check.sh` with carry [".whl", ".gpu"] and a timeout that leaves room for a rerun.
# On an H200 (2026-12-04) a run took 135-195 s, plus ≈30 s to start the machine. Since then it also tunes the
# attention kernel (7 configs, compiled at first use), runs the engine in fp16 and bf16 and the traffic once
# more without the output overlap: expect ≈40-60 s more (not yet measured).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
tokenizer=~/.cache/lora-mux/smollm2-135m-instruct
[ -d .gpu ] && tokenizer=.gpu
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -m bench.gpu_check --tokenizer "$tokenizer" ${OUT:+--out "$OUT"} "$@"
