#!/usr/bin/env bash
# How the H200 profile's measured tables are made: `lynxsim calibrate` (production kernels) for every deployment
# the experiments use, one process per table key (a CUDA fault in one cannot spoil the next), each written into
# lynxsim/hw_profiles/h200.yaml and lynxsim/hw_profiles/h200.tables/ (the checkout's package data: the script runs
# the checkout's lynxsim from the repository root) as soon as it is measured.
#
#   lynxsim/hw_profiles/calibrate_h200.sh JOB ...     JOB = MODEL[:tpG|:epN|:fp8][:nomoe]
#     MODEL            every table of the catalog model on one GPU
#     MODEL:tp4        one rank's shard of a 4-way tensor-parallel instance (tables MODEL@tp4)
#     MODEL:ep4        one rank's experts of a 4-way expert-parallel instance (table MODEL@ep4/moe)
#     MODEL:fp8        the model's routed experts in FP8 (W8A8) on one GPU (table MODEL@fp8/moe)
#     MODEL:tp4:nomoe  the shard without its moe table (an EP instance's attention and dense parts)
#
# Needs an H200 (it refuses another GPU: these tables are the H200 profile's), torch and triton. OUT (default
# /tmp/calibration) receives the log and, after each job, a tarball of the profile and its tables. PROFILE=h100-sxm
# (and an H100) writes that profile's tables instead.
set -u
OUT=${OUT:-/tmp/calibration}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.."
LOG="$OUT/calibration_log.txt"
GPU=$(python3 -c 'import torch; print(torch.cuda.get_device_name())')
echo "$(date -u +%FT%TZ) GPU: $GPU" | tee -a "$LOG"
PROFILE=${PROFILE:-h200}
case "$PROFILE:$GPU" in
  h200:*H200*|h100-sxm:*H100*) ;;
  *) echo "profile $PROFILE does not describe this GPU ($GPU): its tables must come from its own GPU" | tee -a "$LOG"
     exit 3 ;;
esac
NON_MOE_UNITS=(attention_decode attention_prefill dense_layer dense_ffn_layer embedding lm_head graph_launch
               dense_layer_gemms)
for job in "$@"; do
  IFS=: read -r model parallel units <<< "$job"
  args=(--models "$model" --profile "$PROFILE" --budget-s "${BUDGET_S:-150}" --repeats "${REPEATS:-7}")
  case "$parallel" in
    tp*) args+=(--tensor-parallel "${parallel#tp}") ;;
    ep*) args+=(--expert-parallel "${parallel#ep}") ;;
    fp8) args+=(--expert-dtype fp8) ;;
  esac
  if [ "${units:-}" = nomoe ] || [ "$parallel" = nomoe ]; then args+=(--units "${NON_MOE_UNITS[@]}"); fi
  started=$(date +%s)
  if timeout "${JOB_TIMEOUT_S:-300}" python3 -m lynxsim.calib.commands calibrate "${args[@]}" >> "$LOG" 2>&1; then
    echo "$(date -u +%FT%TZ) done $job in $(( $(date +%s) - started )) s" | tee -a "$LOG"
  else
    echo "$(date -u +%FT%TZ) FAILED $job after $(( $(date +%s) - started )) s" | tee -a "$LOG"
  fi
  tar czf "$OUT/tables.tgz" "lynxsim/hw_profiles/$PROFILE.yaml" "lynxsim/hw_profiles/$PROFILE.tables"
done
