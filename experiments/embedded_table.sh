#!/usr/bin/env bash
# The embedded-model comparison table: methods x {W8A8, W6A6, W4A8} x sampling seeds {0, 1, 2}.
#
#   bash experiments/embedded_table.sh OUT_DIR [METHOD ...] [-- extra run.py overrides]
#   python -m tqdit.report OUT_DIR
#
# Each (method, bits) is calibrated once, in its seed-0 job; seeds 1 and 2 re-sample from that job's
# quant_params.safetensors (quant.load=), so the three seeds differ only in sampling noise and labels.
# Methods run in parallel (one background process each; meant for a GPU), their bit settings in turn.
# Defaults: N = 2000 samples, every method; e.g. `-- quant/recon=quick` for the short reconstruction.
# BITS="16/16 8/8 6/6 4/8" (W/A pairs, the default) chooses the bit settings; 16/16 is the W16 control
# row, and the noise method (in the default list) the noise control.
set -euo pipefail
out=${1:?usage: embedded_table.sh OUT_DIR [METHOD ...] [-- overrides]}
shift
methods=()
while [[ $# -gt 0 && $1 != "--" ]]; do methods+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
extra=("$@")
[[ ${#methods[@]} -eq 0 ]] && methods=(fp noise uniform ptq4dm qdiffusion ptq4dit mrq_tgq)
common=(num_samples=2000 batch_size=1000 hydra.output_subdir=null "${extra[@]}")
mkdir -p "$out"

run_method() {
  local method=$1
  if [[ $method == fp ]]; then
    for seed in 0 1 2; do python run.py quant=fp seed=$seed hydra.run.dir="$out/fp-seed$seed" "${common[@]}"; done
    return
  fi
  for bits in ${BITS:-16/16 8/8 6/6 4/8}; do
    local w=${bits%/*} a=${bits#*/}
    local base="$out/$method-w${w}a${a}"
    python run.py quant=$method w_bits=$w a_bits=$a seed=0 hydra.run.dir="$base-seed0" "${common[@]}"
    for seed in 1 2; do
      python run.py quant=$method w_bits=$w a_bits=$a seed=$seed quant.load="$base-seed0/quant_params.safetensors" \
        hydra.run.dir="$base-seed$seed" "${common[@]}"
    done
  done
}

for method in "${methods[@]}"; do
  run_method "$method" > "$out/$method.log" 2>&1 &
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
cat "$out"/*.log | tr "\r" "\n" | grep -E "FID|error" | grep -v "it/s" || true
exit $status
