#!/usr/bin/env bash
# The --device cuda paths on a machine with an NVIDIA GPU, in stages that fit a short
# lease (15 minutes of device time, 10 a command):
#   chain           the main chain on cuda: every command, method and curvature (~2 min)
#   user-nets       a GRU and an attention net of a user's on sequences: every curvature,
#                   self-influence (cuDNN off for the GRU's derivatives; ~2 min on a CPU)
#   scale-resnet    scale.py's ResNet-18 (width 64) on 50,000 images, timed against
#                   retraining in the same run, at GPU_EPOCHS epochs (default 5)
#   scale-densenet  the paper's DenseNet on 60,000 images, likewise
#   tests           the test suite (CPU paths; CI runs it already)
# Usage: bash benchmarks/gpu_check.sh OUTDIR [STAGE ...]   (default: scale-resnet chain)
# Stages run in the order given, each on its own, and a command that fails does not end
# its stage: it is named as it fails and again in the summary at the end (exit 1), and
# the commands after it still run, so one broken command costs a lease neither the
# figures of another stage nor what the rest of its own would have shown (a command
# that needs the failed one's output fails too, in seconds; the first named is the cause).
# Wheels in .whl/ (benchmarks/gpu_wheels.sh, carried) are installed first, for a machine
# whose image lacks curvlinops or typer. Fewer epochs than the issue's 20 make retraining
# cheaper, so a ratio to it is an upper bound on the ratio to a 20-epoch retrain.
# GPU_CHECK_DEVICE=cpu runs the same commands on the CPU: a rehearsal of chain and
# user-nets (8 minutes on 2 cores) before spending a lease on them; GPU_ROWS=N with it
# runs the scale- stages on N images instead of 50,000 or 60,000 (the same code path).
set -uo pipefail
dev=${GPU_CHECK_DEVICE:-cuda}
dev0=$([ "$dev" = cuda ] && echo cuda:0 || echo "$dev")
out=${1:-gpu-check-out}
shift || true
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(scale-resnet chain)
mkdir -p "$out"
# Everything also into a file under OUTDIR: a device run returns only its output's tail.
exec > >(tee "$out/gpu_check.log") 2>&1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
failures="$out/failed-commands.txt"
: > "$failures"
stage=setup
step() {  # run a command; a failure is named, recorded and passed over
  "$@" && return 0
  local status=$?
  echo "== FAILED (exit $status) in $stage: $*"
  echo "$stage: $* (exit $status)" >> "$failures"
  return 0
}
puma() { step python3 -m puma_cli "$@"; }
python3 -c "import torch, typer, sklearn, safetensors, curvlinops; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'typer', typer.__version__)" || exit 1

stage_tests() {
  step python3 -m pytest -q -p no:cacheprovider -x tests 2>&1 | tail -5
}
stage_chain() {
puma make-data radial -o "$out/r.csv" --test-frac 0.2 --json
puma train "$out/r.csv" --test "$out/r-test.csv" -o "$out/r.safetensors" --device "$dev" --json
puma mark "$out/r.csv" --class 1 -o "$out/ids.txt" --json
for method in puma influence retrain; do
  puma remove -m "$out/r.safetensors" --marked "$out/ids.txt" --method "$method" -o "$out/r-$method.safetensors" --device "$dev" --json
done
puma eval -m "$out/r-puma.safetensors" --device "$dev" --json
puma eval -m "$out/r-puma.safetensors" --device "$dev0" --json  # a GPU by index
puma remove -m "$out/r.safetensors" --marked "$out/ids.txt" --method ssd -o "$out/r-ssd.safetensors" --device "$dev" --json
puma train "$out/r.csv" --test "$out/r-test.csv" -o "$out/r-sisa.safetensors" --shards 4 --slices 2 --device "$dev" --json
puma remove -m "$out/r-sisa.safetensors" --marked "$out/ids.txt" --method sisa --device "$dev" --json
puma eval -m "$out/r-sisa.removed.safetensors" --device "$dev" --json
puma train "$out/r.csv" --test "$out/r-test.csv" -o "$out/r-amn.safetensors" --record-updates --group-ids "$out/ids.txt" --device "$dev" --json
puma remove -m "$out/r-amn.safetensors" --marked "$out/ids.txt" --method amnesiac --device "$dev" --json
puma eval -m "$out/r-puma.safetensors" --device cpu --json
puma train sample_data/digits-train.npz --arch cnn --test sample_data/digits-test.npz -o "$out/d.safetensors" --device "$dev" --json
puma mark sample_data/digits-train.npz --all-classes -o "$out/d-ids.txt" --json
for method in puma puma retrain; do
  puma remove -m "$out/d.safetensors" --marked "$out/d-ids.txt" --method "$method" -o "$out/d-$method.safetensors" --device "$dev" --json --overwrite
done
puma make-data moons -o "$out/noisy.csv" --n 500 --flip-labels 0.1 --seed 2
puma train "$out/noisy.csv" -o "$out/noisy.safetensors" --epochs 60 --device "$dev" --json
puma debug-labels -m "$out/noisy.safetensors" --truth "$out/noisy-flipped.txt" --device "$dev" --json
puma debug-labels -m "$out/noisy.safetensors" --truth "$out/noisy-flipped.txt" --device "$dev" --score self-influence --json
puma calibrate -m "$out/noisy.safetensors" --device "$dev" --json
puma attack -m "$out/r.safetensors" --targets "$out/ids.txt" --device "$dev" --json
puma attack -m "$out/r.safetensors" --targets "$out/ids.txt" --attack lira --shadows 8 --device "$dev" --json
puma attack -m "$out/r-puma.safetensors" --targets "$out/ids.txt" --attack lira-online --shadows 8 --device "$dev" --json
puma attack -m "$out/r-puma.safetensors" --targets "$out/ids.txt" --attack shokri --shadows 8 --device "$dev" --json
puma attack -m "$out/r-sisa.safetensors" --targets "$out/ids.txt" --attack shokri --shadows 4 --device "$dev" --json
# Issue 10: curvature backends, the built-in image networks and imported weights on cuda.
for curvature in ggn kfac ekfac; do
  puma remove -m "$out/d.safetensors" --marked "$out/d-ids.txt" --curvature "$curvature" -o "$out/d-$curvature.safetensors" --device "$dev" --json --overwrite
done
puma train sample_data/digits-train.npz --arch resnet18 --arch-args '{"width": 8}' --epochs 3 --test sample_data/digits-test.npz -o "$out/d-resnet.safetensors" --device "$dev" --json
puma remove -m "$out/d-resnet.safetensors" --marked "$out/d-ids.txt" --curvature kfac -o "$out/d-resnet-kfac.safetensors" --device "$dev" --json
puma train sample_data/digits-train.npz --arch densenet --arch-args '{"growth_rate": 4, "blocks": [1, 1, 1, 1]}' --epochs 3 -o "$out/d-dense.safetensors" --device "$dev" --json
puma remove -m "$out/d-dense.safetensors" --marked "$out/d-ids.txt" --curvature ekfac -o "$out/d-dense-ekfac.safetensors" --device "$dev" --json
# Mixed precision: the same recipe with bfloat16 autocast, timed against float32.
puma train sample_data/digits-train.npz --arch resnet18 --arch-args '{"width": 8}' --epochs 3 --test sample_data/digits-test.npz -o "$out/d-resnet-mp.safetensors" --mixed-precision --device "$dev" --json
# A class-weighted loss (--class-weight): trained, removed with K-FAC (each row's output
# gradients scaled by the root of its class weight) and retrained with the weights on cuda.
puma train sample_data/digits-train.npz --arch cnn --class-weight balanced --epochs 5 -o "$out/d-cw.safetensors" --device "$dev" --json
puma remove -m "$out/d-cw.safetensors" --marked "$out/d-ids.txt" --curvature kfac -o "$out/d-cw-kfac.safetensors" --device "$dev" --json
puma remove -m "$out/d-cw.safetensors" --marked "$out/d-ids.txt" --method retrain -o "$out/d-cw-rt.safetensors" --device "$dev" --json
# The CIFAR recipe's flips, crops and cosine schedule, with mixup and CutMix, on cuda, and a
# retrain that re-runs them.
puma train sample_data/digits-train.npz --arch resnet18 --arch-args '{"width": 8}' --epochs 3 --augment flip-crop --lr-schedule cosine --mixup 0.2 --cutmix 1.0 -o "$out/d-resnet-aug.safetensors" --device "$dev" --json
puma remove -m "$out/d-resnet-aug.safetensors" --marked "$out/d-ids.txt" --method retrain -o "$out/d-resnet-aug-rt.safetensors" --device "$dev" --json
# Weights trained elsewhere behind a declared transform (ToTensor's divisor), retrained
# on cuda behind it with AdamW and label smoothing: the digits CNN's own network, exported
# as a plain state dict, and the retrained one exported back under its names.
puma export "$out/d.safetensors" -o "$out/d-net.safetensors" --device "$dev" --json
puma import "$out/d-net.safetensors" --arch cnn --data sample_data/digits-train.npz --val sample_data/digits-test.npz --input-divisor 16 --epochs 3 --optimizer adamw --weight-decay 0.01 --label-smoothing 0.1 -o "$out/d-imported.safetensors" --device "$dev" --json
puma remove -m "$out/d-imported.safetensors" --marked "$out/d-ids.txt" --method retrain -o "$out/d-imported-rt.safetensors" --device "$dev" --json
puma remove -m "$out/d-imported.safetensors" --marked "$out/d-ids.txt" --curvature ekfac -o "$out/d-imported-p.safetensors" --device "$dev" --json
puma export "$out/d-imported-p.safetensors" -o "$out/d-imported-p-net.safetensors" --like "$out/d-net.safetensors" --device "$dev" --json
}
stage_user-nets() {
# Your own nets on sequences: a GRU (cuDNN's RNN backward refuses the eval mode every
# derivative is taken in, so the engine runs it without cuDNN) and attention (composite).
step python3 - "$out" <<'PY'
import sys
from pathlib import Path
import numpy as np
out = Path(sys.argv[1])
rng = np.random.default_rng(0)
y = rng.integers(0, 3, 600)
X = rng.normal(0, 1, (600, 12, 4)).astype(np.float32)
X[:, :, 0] += y[:, None]
np.savez(out / "seq.npz", X=X, y=y)
(out / "seq-ids.txt").write_text("".join(f"{i}\n" for i in range(6)))
(out / "seqnets.py").write_text("""
from torch import nn
class GRUNet(nn.Module):
    def __init__(self, input_shape, n_classes, hidden=16):
        super().__init__()
        self.rnn = nn.GRU(input_shape[-1], hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_classes)
    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])
class AttentionNet(nn.Module):
    def __init__(self, input_shape, n_classes, dim=16):
        super().__init__()
        self.inp = nn.Linear(input_shape[-1], dim)
        self.encoder = nn.TransformerEncoderLayer(dim, 2, 32, batch_first=True)
        self.head = nn.Linear(dim, n_classes)
    def forward(self, x):
        return self.head(self.encoder(self.inp(x)).mean(1))
""")
PY
for net in GRUNet AttentionNet; do
  puma train "$out/seq.npz" --arch "$out/seqnets.py:$net" --epochs 5 -o "$out/seq-$net.safetensors" --device "$dev" --json
  for curvature in exact ggn kfac; do
    puma remove -m "$out/seq-$net.safetensors" --marked "$out/seq-ids.txt" --curvature "$curvature" -o "$out/seq-$net-$curvature.safetensors" --device "$dev" --json
  done
  puma debug-labels -m "$out/seq-$net.safetensors" --score self-influence --device "$dev" --json
done
}
epochs=${GPU_EPOCHS:-5}
rows=()
[ -n "${GPU_ROWS:-}" ] && rows=(--rows "$GPU_ROWS")
stage_scale-resnet() {
  step python3 benchmarks/scale.py --device "$dev" --epochs "$epochs" --cases gpu-resnet18-50k \
      ${rows[@]+"${rows[@]}"} --out "$out/scale-gpu-resnet.md"
}
stage_scale-densenet() {
  step python3 benchmarks/scale.py --device "$dev" --epochs "$epochs" --cases gpu-densenet-60k \
      ${rows[@]+"${rows[@]}"} --out "$out/scale-gpu-densenet.md"
}

failed=()
for stage in "${stages[@]}"; do
  if ! declare -F "stage_$stage" > /dev/null; then
    echo "no stage $stage (chain, user-nets, scale-resnet, scale-densenet, tests)"
    failed+=("$stage")
    continue
  fi
  echo "== $stage at $(date +%T)"
  before=$(wc -l < "$failures")
  "stage_$stage"
  [ "$(wc -l < "$failures")" -eq "$before" ] || failed+=("$stage")
done
echo "== done at $(date +%T); failed: ${failed[*]:-none}"
[ -s "$failures" ] && { echo "== failed commands, in order:"; cat "$failures"; }
[ ${#failed[@]} -eq 0 ]
