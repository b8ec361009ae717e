#!/usr/bin/env bash
# Build the binarized data of the tiny example configs from the bundled corpus, with the same commands a user
# runs on their own data. Writes examples/stage{1,2,3}/data-bin (or under OUT_ROOT, the first argument), replacing
# an earlier data-bin whole (--overwrite).
#
#   bash scripts/make_example_data.sh [OUT_ROOT]
#
# SPEECHGPT names the command to run (default: `speechgpt` on PATH).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CORPUS=$REPO/examples/corpus
OUT_ROOT=${1:-$REPO/examples}
VOCAB=(--vocab "$CORPUS/tokenizer.model" --num-units 100)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SPEECHGPT=${SPEECHGPT:-speechgpt}
run() { echo "+ $*" >&2; "$@"; }

# stage 1: unit sequences (k-means labels; the test split holds open prompts)
run "$SPEECHGPT" prepare-units --no-progress --overwrite "${VOCAB[@]}" --out "$OUT_ROOT/stage1/data-bin" \
    train="$CORPUS/train.km" valid="$CORPUS/valid.km" test="$CORPUS/test.txt" --open test

# stage 2: ASR/TTS instructions from the (units, transcript) pairs
for split in train valid test; do
  run "$SPEECHGPT" build-cross-modal --no-progress --units "$CORPUS/$split.km" --text "$CORPUS/$split.wrd" \
      --seed 0 --num-units 100 --out "$WORK/cm_$split.jsonl"
done
run "$SPEECHGPT" prepare-sft --no-progress --overwrite "${VOCAB[@]}" --out "$OUT_ROOT/stage2/data-bin" \
    train="$WORK/cm_train.jsonl" valid="$WORK/cm_valid.jsonl" test="$WORK/cm_test.jsonl"

# stage 3: chain-of-modality answers to the spoken questions
for split in train valid test; do
  run "$SPEECHGPT" build-com --no-progress --manifest "$CORPUS/qa_$split.jsonl" --seed 0 --num-units 100 \
      --out "$WORK/com_$split.jsonl"
done
run "$SPEECHGPT" prepare-sft --no-progress --overwrite "${VOCAB[@]}" --out "$OUT_ROOT/stage3/data-bin" \
    train="$WORK/com_train.jsonl" valid="$WORK/com_valid.jsonl" test="$WORK/com_test.jsonl"
