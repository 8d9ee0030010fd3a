#!/usr/bin/env bash
# The main job on shipped data, every step reading and writing files:
# make-data -> train -> mark -> remove -> eval -> attack -> relink, the baselines, then
# debug-labels and calibrate.
set -euo pipefail
out=demo-out
mkdir -p "$out"
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step puma make-data radial -o "$out/radial.csv" --test-frac 0.2 --seed 0 --overwrite
step puma train "$out/radial.csv" --test "$out/radial-test.csv" -o "$out/radial.safetensors" --overwrite
step puma mark "$out/radial.csv" --class 1 --clusters 8 -o "$out/marked.txt" --overwrite
step puma eval --model "$out/radial.safetensors" --data "$out/radial.csv" --ids "$out/marked.txt"
step puma remove --model "$out/radial.safetensors" --marked "$out/marked.txt" --overwrite
step puma remove --model "$out/radial.safetensors" --marked "$out/marked.txt" --method retrain \
    -o "$out/radial.retrained.safetensors" --overwrite
step puma eval --model "$out/radial.removed.safetensors" --data "$out/radial.csv" --ids "$out/marked.txt"
step puma eval --model "$out/radial.retrained.safetensors" --data "$out/radial.csv" --ids "$out/marked.txt"
step puma eval --model "$out/radial.removed.safetensors"
for model in radial radial.removed radial.retrained; do
  step puma attack --model "$out/$model.safetensors" --targets "$out/marked.txt" --json
  step puma attack --model "$out/$model.safetensors" --targets "$out/marked.txt" --attack lira \
      --shadows 8 --json   # the shadows are trained once, cached in demo-out/, and shared
  step puma attack --model "$out/$model.safetensors" --targets "$out/marked.txt" --attack shokri \
      --shadows 8 --json   # the paper's attack, on the same cached shadows
done

# Then the data: the marked rows deleted from the training file (as a deletion request
# asks), and the model pointed at the file as it is now, for the next request.
grep -v '^#' "$out/marked.txt" > "$out/marked-ids.txt"
awk -F, 'NR == FNR { gone[$1]; next } FNR == 1 || !($1 in gone)' "$out/marked-ids.txt" \
    "$out/radial.csv" > "$out/radial-now.csv"
step puma relink "$out/radial.removed.safetensors" --data "$out/radial-now.csv" \
    -o "$out/radial.relinked.safetensors" --overwrite
step puma eval --model "$out/radial.relinked.safetensors"

# The baselines: SISA retrains only the shards that held the marked points; Amnesiac
# subtracts the recorded updates of their batches (grouped together: the ordered scenario);
# SSD dampens the parameters that matter most to them.
step puma train "$out/radial.csv" --test "$out/radial-test.csv" --shards 5 --slices 2 \
    -o "$out/radial-sisa.safetensors" --overwrite
step puma remove --model "$out/radial-sisa.safetensors" --marked "$out/marked.txt" --method sisa --overwrite
step puma train "$out/radial.csv" --test "$out/radial-test.csv" --record-updates \
    --group-ids "$out/marked.txt" -o "$out/radial-amnesiac.safetensors" --overwrite
step puma remove --model "$out/radial-amnesiac.safetensors" --marked "$out/marked.txt" \
    --method amnesiac --overwrite
step puma remove --model "$out/radial.safetensors" --marked "$out/marked.txt" --method ssd \
    -o "$out/radial.ssd.safetensors" --overwrite

step puma train sample_data/german-credit-train.csv --test sample_data/german-credit-test.csv \
    -o "$out/german.safetensors" --overwrite
step puma mark sample_data/german-credit-train.csv --all-classes -o "$out/german-marked.txt" --overwrite
step puma eval --model "$out/german.safetensors" --data sample_data/german-credit-train.csv \
    --ids "$out/german-marked.txt" --json
step puma remove --model "$out/german.safetensors" --marked "$out/german-marked.txt" --overwrite
step puma info "$out/german.removed.safetensors"

# Every method on one request, side by side with retraining; then the unlearning audit:
# could an attacker tell PUMA's removal from retraining? (U-LiRA, 8 shadow models.)
step puma compare --model "$out/radial.safetensors" --marked "$out/marked.txt" \
    --methods puma,finetune,neggrad,scrub --out-dir "$out/compare" --plot "$out/compare.png" --overwrite
step puma attack --model "$out/radial.removed.safetensors" --targets "$out/marked.txt" \
    --attack u-lira --shadows 8

# The same engine on mislabelled data: 10 % of the labels flipped, then found and recalibrated.
step puma make-data moons -o "$out/noisy.csv" --n 500 --flip-labels 0.1 --seed 2 --overwrite
step puma train "$out/noisy.csv" -o "$out/noisy.safetensors" --epochs 60 --overwrite
step puma debug-labels --model "$out/noisy.safetensors" -k 20 -o "$out/suspects.csv" \
    --truth "$out/noisy-flipped.txt" --plot "$out/found.png" --overwrite
step puma calibrate --model "$out/noisy.safetensors" --plot "$out/reliability.png" --overwrite
printf '\nDemo outputs are in %s/\n' "$out"
