#!/usr/bin/env bash
# Benchmark v2 (issue 11) of one reference target: the three held-out sets (new scene seeds with training-mix
# instructions; new seeds with held-out wordings; the bundled photos) at T=0 and T=1, every method interleaved per
# prompt, float32 target (greedy outputs checked identical to plain decoding); then the bfloat16-target runs (T=0,
# with the share of prompts and tokens identical to bf16 plain decoding) and "does the drafter use the image" (set a,
# each drafter with the real and with a blank picture). Resumable: a result JSON that exists is not run again.
#
#   TARGET=reference:smolvlm-ref DREAM=DIR EAGLE=DIR [EXTRA="ttt=DIR eagle3=DIR"] [THREADS=2] [NUM=24] \
#       bash benchmarks/reference/benchmark_v2.sh OUT_DIR
#
# THREADS: measure plain decoding with 1 and 2 first and use the faster for every run (on the 2-core CPU, 2).
set -euo pipefail
out=${1:?usage: TARGET=reference:NAME DREAM=DIR EAGLE=DIR bash benchmarks/reference/benchmark_v2.sh OUT_DIR}
target=${TARGET:?set TARGET (reference:smolvlm-ref or reference:gemma3-ref)}
threads=${THREADS:-2}
num=${NUM:-24}
sets=$out/sets
mkdir -p "$out"
python -c "from hf_dream.reference.prompts import benchmark_sets; benchmark_sets('$sets', num=$num)"

drafters=(--drafter "dream=${DREAM:?set DREAM}" --drafter "dream_auto=$DREAM" --drafter "eagle=${EAGLE:?set EAGLE}")
methods=ar,prompt_lookup,eagle,dream,dream_auto,dream_tree
for extra in ${EXTRA:-}; do
  drafters+=(--drafter "$extra")
  methods+=",${extra%%=*}"
done
common=(--target "$target" --max-new-tokens 256 --threads "$threads" --tree-total-tokens auto --draft-schedule dream_auto=auto)

run() {  # run OUT_JSON ARGS...: skip a result that exists; a bf16 target's expected mismatches (exit 2) do not stop the suite
  local json=$1
  shift
  if [[ -f $json ]]; then
    echo "exists, skipped: $json"
    return
  fi
  hf-dream bench "$@" --out "$json" || { status=$?; [[ $status -eq 2 && " $* " == *" bfloat16 "* ]] || exit $status; }
}

for set in scenes scenes-new-wordings photos; do
  for temperature in 0 1; do
    run "$out/$set-T$temperature.json" "${common[@]}" "${drafters[@]}" --methods "$methods" \
      --prompts "$sets/$set/prompts.jsonl" --temperature "$temperature"
  done
  run "$out/$set-bf16-T0.json" "${common[@]}" "${drafters[@]}" --methods "$methods" \
    --prompts "$sets/$set/prompts.jsonl" --temperature 0 --target-dtype bfloat16
done

# does the drafter use the image? each drafter also reads the prompt through a blank picture (the target is unchanged)
run "$out/drafter-image-scenes-T0.json" --target "$target" --max-new-tokens 256 --threads "$threads" \
  --drafter "dream=$DREAM" --drafter "dream_blank=$DREAM" --drafter "eagle=$EAGLE" --drafter "eagle_blank=$EAGLE" \
  --drafter-image dream_blank=blank --drafter-image eagle_blank=blank --methods ar,dream,dream_blank,eagle,eagle_blank \
  --prompts "$sets/scenes/prompts.jsonl" --temperature 0
echo "benchmark v2 of $target: $out"
