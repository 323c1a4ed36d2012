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
# row, and the noise method (in the default list) the noise control. ARGS_<method>="..." adds overrides for
# one method only, e.g. ARGS_qdit="quant.params.group_size=32" (its own quant.params are unknown to others).
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

run_setting() {  # one method at one bit setting: calibrated at seed 0, re-sampled at seeds 1 and 2
  local method=$1 w=$2 a=$3
  local own="ARGS_$method"
  local args=(${!own:-})
  if [[ $method == fp ]]; then
    for seed in 0 1 2; do python run.py quant=fp seed=$seed hydra.run.dir="$out/fp-seed$seed" "${common[@]}"; done
    return
  fi
  local base="$out/$method-w${w}a${a}"
  python run.py quant=$method w_bits=$w a_bits=$a seed=0 hydra.run.dir="$base-seed0" "${common[@]}" "${args[@]}"
  for seed in 1 2; do
    python run.py quant=$method w_bits=$w a_bits=$a seed=$seed quant.load="$base-seed0/quant_params.safetensors" \
      hydra.run.dir="$base-seed$seed" "${common[@]}" "${args[@]}"
  done
}

for method in "${methods[@]}"; do  # one background process per method and bit setting
  if [[ $method == fp ]]; then
    run_setting fp 0 0 > "$out/fp.log" 2>&1 &
    continue
  fi
  for bits in ${BITS:-16/16 8/8 6/6 4/8}; do
    run_setting "$method" "${bits%/*}" "${bits#*/}" > "$out/$method-w${bits%/*}a${bits#*/}.log" 2>&1 &
  done
done
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
cat "$out"/*.log | tr "\r" "\n" | grep -E "FID|error" | grep -v "it/s" || true
exit $status
