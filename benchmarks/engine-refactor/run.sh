#!/bin/bash
# hf-dream bench before the engine refactor (643bfa0, parent of 06ea544) and after (this checkout), same prompts and drafter weights.
# usage: benchmarks/engine-refactor/run.sh BEFORE_WORKTREE OUT_DIR [order: before-after | after-before]
#   BEFORE_WORKTREE: `git worktree add --detach /tmp/before 643bfa0`; prompts: hf_dream.reference.prompts.evaluation_prompts(OUT_DIR/prompts)
set -e
BEFORE=$1; OUT=$(realpath $2); ORDER=${3:-before-after}; HERE=$(pwd)
P=$OUT/prompts/prompts.jsonl
[ -f $P ] || python -c "from hf_dream.reference.prompts import evaluation_prompts; evaluation_prompts('$OUT/prompts')"
ARGS="--target reference:smolvlm-ref --prompts $P --methods ar,prompt_lookup,dream,dream_tree --temperature 0 --max-new-tokens 96 --limit 10 --threads 2 --tree-total-tokens auto"
before() { (cd $BEFORE && PYTHONPATH=$BEFORE HF_DREAM_CACHE=$OUT/cache-before python -m hf_dream bench $ARGS --drafter dream=model_cards/dream-smolvlm-ref --out $OUT/$1-T0.json); }
after() { (cd $HERE && HF_DREAM_CACHE=$OUT/cache-after python -m hf_dream bench $ARGS --drafter dream=hf_dream/reference/drafters/dream-smolvlm-ref --out $OUT/$1-T0.json); }
if [ $ORDER = before-after ]; then before before; after after; else after after2; before before2; fi
