#!/usr/bin/env bash
# The GPU checks of the consumer-GPU work (issue 10) in one run of about 8 minutes on one H200, from the repo root:
#   - the training matrix (the presets, and the two settings they are held against) vs diffusers' train_dreambooth.py;
#   - class-image generation, ours vs diffusers' StableDiffusionPipeline (images/s);
#   - the command line's whole run (pick-token, train with class images and a preview, sample) with each process
#     capped at 5.8, 7.6 and 11.6 GiB, the peak of every phase.
# Results (markdown, JSON, the log) go to $OUT, or bench-gpu/ here. More arguments go to bench/dreambooth_bench.py
# (on a CPU, to try the wiring: bash bench/gpu_check.sh --small --no-reference --steps 3 --warmup 1 --class-images 8).
#
# Where a step's time goes (issue 10 point 4), estimated 2-3 minutes: bash bench/gpu_check.sh profile (one step per
# setting of a full-size random SD 1.5 at 512 px under torch.profiler: the GPU's busy share, launches, host waits).
#
# Scoring while training (issue 13), estimated 4-5 minutes on one H200: bash bench/gpu_check.sh evaluation
# (bench/evaluation_cost.py on a full-size random SD 1.5 at the 24GB preset, the fastest: 400 steps, every 100).
#
# SDXL (issue 12), about 8 minutes on one H200:
#   bash bench/gpu_check.sh sdxl PATH/TO/train_text_to_image_sdxl.py [more dreambooth_bench.py arguments]
# a full-size random SDXL at 1024 px: the presets 12GB (capped at 11.6 GiB), 12GB+te (capped at 15.6: a 16 GB card)
# and 24GB (23.6), and ours and diffusers' train_text_to_image_sdxl.py at its best setting (bf16, 8-bit AdamW,
# checkpointing; batch 2: our photo and class image), 6 steps of which 2 warm-up; then the command line's whole run
# capped at 11.6 (UNet) and 15.6 GiB (both text encoders trained). The script's path is an argument: it is never
# committed (fetch diffusers' examples/text_to_image/train_text_to_image_sdxl.py); it needs `datasets`, which
# bench/stand_ins/ stands in for where it is missing.
#
# The example workflow in a real ComfyUI (issue 10), capped at 5.8, 7.6 and 11.6 GiB, every node's and phase's peak:
#   bash bench/gpu_check.sh comfyui PATH/TO/ComfyUI [ITS_PYTHON]      (bench/comfyui_bench.py; ComfyUI's Python needs
#   its requirements and this pack's)
#
# Needs: a Python with torch (CUDA), torchvision, transformers, accelerate, diffusers and bitsandbytes; where diffusers
# or bitsandbytes are missing, put their wheels in .whl/ (bench/README.md says how) and they are installed to
# /tmp/site. The reference script: $DREAMBOOTH_REFERENCE_SCRIPT, else .whl/train_dreambooth.py (a copy of
# ../shared/reference/train_dreambooth.py; never committed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
REFERENCE=${DREAMBOOTH_REFERENCE_SCRIPT:-.whl/train_dreambooth.py}
FAMILY=sd1
if [ "${1:-}" = "evaluation" ]; then  # issue 13: what scoring every 100 of 400 steps adds (SD 1.5 at 512 px)
    "$PYTHON" bench/evaluation_cost.py --family sd1 --preset 24GB --steps 400 --every 100 2>&1 \
        | tee "$OUT/evaluation-cost.txt"
    exit "${PIPESTATUS[0]}"
fi
if [ "${1:-}" = "profile" ]; then  # issue 10 point 4: where the presets' step time goes
    "$PYTHON" bench/step_profile.py --gpu 2>&1 | tee "$OUT/step-profile.txt"
    exit "${PIPESTATUS[0]}"
fi
if [ "${1:-}" = "comfyui" ]; then  # issue 10: the example workflow in ComfyUI, capped as on 8 and 12 GB cards
    COMFYUI=${2:?usage: bash bench/gpu_check.sh comfyui PATH/TO/ComfyUI [ITS_PYTHON]}
    "$PYTHON" bench/comfyui_bench.py --comfyui "$COMFYUI" ${3:+--python "$3"} --out "$OUT/comfyui.md" \
        --out "$OUT/comfyui.json" 2>&1 | tee "$OUT/log-comfyui.txt"
    exit "${PIPESTATUS[0]}"
fi
if [ "${1:-}" = "sdxl" ]; then
    FAMILY=sdxl
    REFERENCE=${2:?usage: bash bench/gpu_check.sh sdxl PATH/TO/train_text_to_image_sdxl.py [ARGS...]}
    shift 2
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch, diffusers, bitsandbytes; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"

if [ "$FAMILY" = "sdxl" ]; then
    "$PYTHON" bench/dreambooth_bench.py --family sdxl --steps 6 --warmup 2 --cap-presets --whole-run 11.6 15.6 \
        --reference-script "$REFERENCE" --reference-python "$PYTHON" --timeout 400 \
        --out "$OUT/bench-sdxl.md" --out "$OUT/bench-sdxl.json" "$@" 2>&1 | tee "$OUT/log-sdxl.txt"
    exit "${PIPESTATUS[0]}"
fi
"$PYTHON" bench/dreambooth_bench.py --family sd1 --steps 12 --warmup 4 --class-images 16 --whole-run 5.8 7.6 11.6 \
    --reference-script "$REFERENCE" --reference-python "$PYTHON" --timeout 300 \
    --out "$OUT/bench.md" --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/log.txt"
