#!/usr/bin/env bash
# The GPU checks of the flagship path, one prepared run of under 10 minutes on one GPU:
#   1. fits at 4x32x32 and 4x64x64 (sd-vae-ft-mse's architecture at 256 and 512 px, random weights) in fp32,
#      with the flagship columns (encode s/image, s/step at batch 256, peak memory, sampler/SIR/Langevin rates,
#      decode, and `latent-prior sample --device cuda` from the CLI);
#   2. the same in bf16 mixed precision;
#   3. `accelerate launch --multi_gpu` on the embedded default, where the machine has more than one GPU.
# Each report goes to $OUT (default /tmp/gpu-checks): flagship-fp32.md/.json, flagship-bf16.md/.json, multi-gpu.log.
#
# It installs the package from the working tree without touching the network (--no-deps; the machine's torch,
# accelerate, safetensors and huggingface_hub serve), so diffusers and its few missing needs must be there or be
# given as wheels in $WHEELS (default .whl/). DEVICE=cpu IMAGES=4 STEPS=4 runs the same script on a CPU as a
# smoke test of the script itself.
set -euo pipefail
OUT=${OUT:-/tmp/gpu-checks}
DEVICE=${DEVICE:-cuda}
IMAGES=${IMAGES:-64}
STEPS=${STEPS:-200}
WHEELS=${WHEELS:-.whl}
PY=${PY:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if ! "$PY" -c "import latent_prior.adapters, diffusers" 2>/dev/null; then
    site=$(mktemp -d)
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .
    export PYTHONPATH="$site:${PYTHONPATH:-}"
    export PATH="$site/bin:$PATH"
fi
"$PY" -c "import torch, latent_prior; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'gpus', torch.cuda.device_count())"

echo "== 1. fits at 4x32x32 and 4x64x64, fp32, batch 256"
"$PY" -m bench.flagship --device "$DEVICE" --resolutions 256,512 --images "$IMAGES" --fit-steps "$STEPS" --batch-size 256 \
    --fit-latents 2048 --out "$OUT/flagship-fp32.md"
cat "$OUT/flagship-fp32.md"

echo "== 2. the same in bf16"
bf16=()
if [ "$DEVICE" = cuda ]; then bf16=(--bf16); fi
"$PY" -m bench.flagship --device "$DEVICE" --resolutions 256 --images "$IMAGES" --fit-steps "$STEPS" --batch-size 256 \
    --fit-latents 2048 "${bf16[@]}" --out "$OUT/flagship-bf16.md"
cat "$OUT/flagship-bf16.md"

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "== 3. accelerate launch --multi_gpu ($gpus GPU(s))"
if [ "$gpus" -gt 1 ]; then
    "$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$gpus" -m latent_prior fit --steps 200 \
        --out "$OUT/multi-gpu-run" 2>&1 | tee "$OUT/multi-gpu.log" | tail -n 5
else
    echo "$gpus GPU(s): --multi_gpu not checked" | tee "$OUT/multi-gpu.log"
fi
