#!/usr/bin/env bash
# One prepared GPU session: continue training the shipped baseline under several recipes in parallel on one GPU
# (a 32 M-parameter model whose 20 M are frozen leaves most of an H100 idle; the data loaders share the CPU cores), then score every
# candidate on the dev subset and send back the best model of the best runs, as a tar split into 15 MiB pieces
# (the device returns at most 8 files of 16 MiB).
#
# Prepare here first (fits the device's 64 MiB transfer limit together with the checkout, once the shipped
# weights and LM are left behind: training starts from the int8 transport copy, and needs no LM):
#   python scripts/gpu/prepare_gpu_bundle.py --train ../shared/data/librispeech-mini/train-clean-5 \
#       --dev ../shared/data/librispeech-mini/dev-clean-2-a --out .gpu --continue-from checkpoints/conformer-ctc-whisper-base
#   (plus the wheels the device lacks in .whl/: soundfile, cffi, pycparser, soxr, jiwer, rapidfuzz)
# Then on the device: OUT=... MINUTES=6.5 bash scripts/gpu/gpu_train.sh   (carry .gpu and .whl)
# Back here: cat OUT/bundle.tar.part* | tar xf - -C runs/; each runs/export/<run>/ holds only the tensors that differ
# from INIT's (the device returns 64 MiB at most):
#   python scripts/gpu/gpu_pick_export.py --fill runs/export/<run> --out runs/<run>   (a whole model folder)
# The same command trains on a CPU (DEVICE=cpu), only slower; each run resumes with --resume if rerun.
set -u
OUT=${OUT:-runs/gpu_out}
MINUTES=${MINUTES:-6.5}
WORKERS=${WORKERS:-3}
THREADS=${THREADS:-1}  # torch threads of each run's main process: more only oversubscribes the CPU
DEVICE=${DEVICE:-auto}
TOP=${TOP:-1}          # how many runs' best models come back (each run that trains Whisper's blocks 4-5 sends
                       # back about 37 MB: two fit the device's 64 MiB only when they train fewer)
DEV=${DEV:-.gpu/dev}   # validation and selection data
INIT=${INIT:-.gpu/init-continue}  # the shipped model, in its transport copy
COMMON=${COMMON:---preset whisper-base --layers 8 --int8-frozen --time-masks 5 --batch-seconds 240 \
--warmup-steps 100 --eval-every 250 --dev-limit 0 --average-last 4 --half}
# name=arguments; the next call: the shipped baseline's stage-4a recipe (Whisper's top two layers trained too) for
# longer, at two peak rates, and with a third layer trained (untried). The calls as run are in the README.
RUNS=${RUNS:-"f4lr3e-4=--lr 3e-4 --freeze-layers 4
f4lr2e-4=--lr 2e-4 --freeze-layers 4
f3lr3e-4=--lr 3e-4 --freeze-layers 3"}
mkdir -p "$OUT" runs
if [ -d .whl ] && ! python3 -c "import soundfile, soxr, jiwer" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -c "import torch, soundfile; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'libsndfile', soundfile.__libsndfile_version__)" || exit 1
mkdir -p runs/export
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 30 > runs/export/gpu_util.csv 2>/dev/null &
monitor=$!
names=()
pids=()
while IFS= read -r line; do
  [ -z "$line" ] && continue
  name=${line%%=*}; args=${line#*=}; names+=("runs/gpu_$name")
  # shellcheck disable=SC2086  # word splitting of the argument strings is intended
  python3 -m asr_core train --data .gpu/train --dev "$DEV" --out "runs/gpu_$name" --init-from "$INIT" \
    --max-minutes "$MINUTES" --workers "$WORKERS" --threads "$THREADS" --device "$DEVICE" $COMMON $args ${EXTRA:-} \
    > "runs/gpu_$name.log" 2>&1 &
  pids+=($!)
done <<< "$RUNS"
wait "${pids[@]}"
kill "$monitor" 2>/dev/null
for run in "${names[@]}"; do echo "== $run"; tr "\r" "\n" < "$run.log" | grep -E "dev WER|audio_sec_per_sec|\"step\"|reason|Error|rror:" | tail -n 14; done
delta=()
[ -f "$INIT/model.safetensors" ] && delta=(--delta-from "$INIT")  # a model folder: send back only what changed
python3 scripts/gpu/gpu_pick_export.py "${names[@]}" --dev "$DEV" --out runs/export --top "$TOP" "${delta[@]}" \
  || echo "pick/export failed"
for run in "${names[@]}"; do  # this call's runs only (a warm machine may hold older ones)
  cp "$run.log" runs/export/ 2>/dev/null; cp "$run/log.csv" "runs/export/$(basename "$run").csv" 2>/dev/null
done
tar cf - -C runs export | split -b 15M - "$OUT/bundle.tar.part"
ls -la "$OUT"
