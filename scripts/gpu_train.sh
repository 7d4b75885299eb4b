#!/usr/bin/env bash
# One prepared GPU session: continue training the shipped baseline at several peak learning rates in parallel
# on one GPU (a 21 M-parameter model leaves most of an H100 idle; the data loaders share the CPU cores), then
# score every candidate on the dev subset and export the winner in fp16 shards to $OUT.
#
# Prepare here first (fits the device's 64 MiB transfer limit together with the checkout):
#   python scripts/prepare_gpu_bundle.py --train ../shared/data/librispeech-mini/train-clean-5 \
#       --dev ../shared/data/librispeech-mini/dev-clean-2-a --out .gpu
#   (plus the wheels the device lacks in .whl/: soundfile, cffi, pycparser, soxr, jiwer, rapidfuzz)
# Then on the device: OUT=... MINUTES=6 bash scripts/gpu_train.sh   (carry .gpu and .whl)
# The same command trains on a CPU (DEVICE=cpu), only slower; each run resumes with --resume if rerun.
set -u
OUT=${OUT:-runs/gpu_out}
MINUTES=${MINUTES:-6}
LRS=${LRS:-"3e-4 6e-4 1.2e-3"}
WORKERS=${WORKERS:-4}
THREADS=${THREADS:-2}  # torch threads of each run's main process: more only oversubscribes the CPU
DEVICE=${DEVICE:-auto}
INIT=${INIT:-checkpoints/conformer-ctc-whisper-tiny}
# the shipped recipe: Whisper's stem and 4 layers frozen, two blocks above them trained (model card)
EXTRA=${EXTRA:---layers 6 --freeze-layers 4 --time-masks 5}
mkdir -p "$OUT" runs
if [ -d .whl ] && ! python3 -c "import soundfile, soxr, jiwer" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -c "import torch, soundfile; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'libsndfile', soundfile.__libsndfile_version__)"
for lr in $LRS; do
  python3 -m asr_core train --data .gpu/train --dev .gpu/dev --out "runs/gpu_lr$lr" --preset whisper-tiny \
    --init-from "$INIT" --max-minutes "$MINUTES" --batch-seconds 240 --lr "$lr" --warmup-steps 100 \
    --eval-every 250 --dev-limit 0 --average-last 4 --workers "$WORKERS" --threads "$THREADS" --device "$DEVICE" $EXTRA \
    > "runs/gpu_lr$lr.log" 2>&1 &
done
wait
for lr in $LRS; do tail -c 1500 "runs/gpu_lr$lr.log" | tr '\r' '\n' | tail -n 6; done
python3 scripts/gpu_pick_export.py runs/gpu_lr* --dev .gpu/dev --out "$OUT"
tar czf "$OUT/logs.tar.gz" runs/gpu_lr*.log runs/gpu_lr*/log.csv
ls -la "$OUT"
