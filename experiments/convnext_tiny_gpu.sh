#!/usr/bin/env bash
# ConvNeXt-Tiny (width 1, depths 3 3 9 3, 27.8M params) Squeeze-Release on Fashion-MNIST within one
# fixed wall-clock budget on a GPU (issue 4): fxmin's CUDA tests and a smoke run of the same code path at
# toy size first, then the dense model, then ours (and the controls, METHODS) with whatever time is left
# (fxmin's time_budget), finishing within the budget too (a reserve is kept for it).
#
#   experiments/convnext_tiny_gpu.sh OUT_DIR [TOTAL_SECONDS=480] [DATA=/usr/share/datasets/fashion-mnist]
#
# Environment:
#   METHODS  processes that share the GPU after the dense model, side by side, each with the same search
#            budget (default "sr"): sr = ours, b = cycles without release, c = a narrower ConvNeXt trained
#            from scratch, with the size and epochs of the run of ours in OURS
#   OURS     raw results of a run of ours that sizes (c) (default: the reported H200 run, seed 0)
#   SEED     default 0;  SECTION: the results.md section the merge writes (default tiny-gpu; give another
#            run another name, e.g. tiny-gpu-seed1, so that it does not replace the reported one)
#   SKIP_TESTS=1 skips the CUDA tests (the smoke run stays)
#   MODEL    e.g. "--width 0.25 --depths 1 1 1 1 --train-samples 2048" for a dry run on a CPU
#
# Writes OUT_DIR/{test_cuda,smoke,dense,tiny-<method>}.log, OUT_DIR/results-tiny-<method>.json and
# OUT_DIR/finish-<loop>.pt (the finishing phase's checkpoint: the chosen, finished model); then, on
# any machine (the files share one dense model, so they merge into one section):
#   .venv/bin/python -m experiments.convnext_fashion --merge OUT_DIR/results-tiny-*.json --write docs/results.md
set -o pipefail
out=${1:?usage: $0 OUT_DIR [TOTAL_SECONDS] [DATA]}
total=${2:-480}
data=${3:-/usr/share/datasets/fashion-mnist}
python=${PYTHON:-python3}
read -r -a methods <<< "${METHODS:-sr}"
ours=${OURS:-docs/device-runs/convnext-tiny-h200/results-tiny-sr.json}
export PYTHONUNBUFFERED=1
mkdir -p "$out"
script="-m experiments.convnext_fashion"
work=${WORK:-/tmp/convnext-tiny-gpu}  # checkpoints (hundreds of MB): not in OUT_DIR
model=(${MODEL:---width 1 --depths 3 3 9 3})
dense_epochs=8
threads=$(( $(nproc) / ${#methods[@]} )); [ "$threads" -ge 1 ] || threads=1
tiny=("${model[@]}" --dense-epochs $dense_epochs --seed "${SEED:-0}" --data "$data" --threads $threads
      --checkpoints "$work/tiny")
start=$SECONDS

"$python" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"
# 0. fxmin's device tests (minimize / release / the cycle on CUDA); the run goes on either way
[ -n "$SKIP_TESTS" ] || timeout 120 "$python" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
# 1. smoke: the whole path (dense, cycles, minimize on the device, release, finishing, JSON) at toy size
timeout 150 "$python" $script --width 0.25 --depths 1 1 1 1 --train-samples 1024 --dense-epochs 0.5 --cycles 2 \
    --squeeze-epochs 0.2 --release-epochs 0.2 --finish-epochs 0.2 --methods sr --data "$data" --threads 8 \
    --checkpoints "$work/smoke" --json "$out/results-smoke.json" 2>&1 | tee "$out/smoke.log" || exit 3
# 2. the dense model (cached for step 3)
timeout $((total * 2 / 5)) "$python" $script "${tiny[@]}" --methods dense 2>&1 | tee "$out/dense.log" || exit 4
# 3. ours and the controls side by side: the cycles get what is left, less a reserve for finishing two
#    candidates (2 epochs each at about the dense model's epoch time, times the processes sharing the GPU)
#    and the evaluations
epoch=$("$python" -c "import glob, torch; s = torch.load(glob.glob('$work/tiny/dense-*.pt')[0], map_location='cpu'); print(int(s['time_s'] / $dense_epochs) + 1)")
left=$((total - (SECONDS - start)))
search=$((left - 4 * epoch * ${#methods[@]} - 45))
echo "dense epoch ~${epoch} s; ${left} s left; search budget ${search} s for each of: ${methods[*]}"
[ "$search" -gt 30 ] || { echo "no time left for the cycles"; exit 5; }
for method in "${methods[@]}"; do
  extra=(); [ "$method" = c ] && extra=(--ours "$ours")
  timeout $((left + 30)) "$python" $script "${tiny[@]}" --methods "$method" --search-seconds $search \
      --finish-candidates 2 --section "${SECTION:-tiny-gpu}" "${extra[@]}" --json "$out/results-tiny-$method.json" \
      > "$out/tiny-$method.log" 2>&1 &
done
wait
# the finished candidates and the chosen model of each loop (a few MB), for benchmarks/deployed.py
for folder in squeeze-release no-release; do
  [ -f "$work/tiny/$folder/finish.pt" ] && cp "$work/tiny/$folder/finish.pt" "$out/finish-$folder.pt"
done
tail -n 30 "$out"/tiny-*.log
