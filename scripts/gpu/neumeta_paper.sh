#!/usr/bin/env bash
# NeuMeta's paper setting (ResNet-20 / CIFAR-10, last block of stage 3 metamorphic, the paper's
# INR 512 x 8 x 32, 200 epochs at batch 64) with the CPU recipe's post-warm-up fix, in ONE call of
# a lent GPU (H200 / H100; the device tool allows 10 minutes per call, 15 per session):
#   1. install the carried wheels (hydra-core, omegaconf, antlr4, fast_tsp: not on the GPU image);
#   2. probe: steps/s of the paper setting's training step, eager and compiled (INR trunk
#      through torch.compile), on random weights; the faster one trains;
#   3. train `experiment=neumeta/paper/resnet20_cifar10` (was neumeta_resnet20_cifar10) for
#      EPOCHS epochs, time-boxed (trainer.max_time) so that the call ends with a checkpoint: if
#      the probe says 200 epochs do not fit in TRAIN_S seconds, EPOCHS is cut to what fits and
#      the MultiStep milestones are scaled with it (the summary says so);
#   4. evaluate with metamorph-eval (gamma 0 ... 0.75, the unseen 0.625 / 0.75 marked);
#   5. strip the checkpoint to the EMA INR (scripts/strip_checkpoint.py; 33.8 MB for the paper
#      INR, so it comes back in <= 15 MiB parts) and pack the logs;
#   at most 8 files under $OUT (the device tool brings them back): summary.json, probe.json,
#   sweep.md, logs.tar.gz, neumeta_r20.ckpt.part-0..2.
#
# Prepare on the CPU box (once):
#   python scripts/build_cifar10_mini.py --src ../shared/data/cifar10-jpeg \
#       --out outputs/data/cifar10-full.bin --name cifar10-full --per-class-train 0 --per-class-test 0
#   bash scripts/gpu/neumeta_paper.sh wheels      # pip download into outputs/whl (Python 3.12)
# Run (device tool): command `bash scripts/gpu/neumeta_paper.sh`, timeout_s 600, carry
#   ["outputs/data/cifar10-full.bin", "outputs/whl", "outputs/models/resnet20_ft_v2.json",
#    "outputs/models/resnet20_ft_v2.safetensors"]
# Dry run on the CPU (embedded cifar10-mini, a handful of steps, the same code path):
#   DRY=1 bash scripts/gpu/neumeta_paper.sh
#
# Settings (environment): OUT, BASE (model file), DATA (data pack), EPOCHS (200), TRAIN_S
# (seconds for fit, 390), COMPILE (auto | 0 | 1), PROBE_STEPS (60).
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "${1:-}" = "wheels" ]; then  # on the CPU box: the packages the GPU image lacks, for cp312
  mkdir -p outputs/whl
  plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d outputs/whl hydra-core==1.3.2 omegaconf==2.3.0 fast_tsp==0.2.2
  # antlr4 4.9.3 (what omegaconf 2.3 pins) ships as a source archive only: build its wheel here
  python3 -m pip wheel -q --no-deps -w outputs/whl antlr4-python3-runtime==4.9.3
  ls -la outputs/whl
  exit 0
fi

DRY=${DRY:-0}
OUT=${OUT:-outputs/gpu/neumeta_paper}
BASE=${BASE:-outputs/models/resnet20_ft_v2.json}
DATA=${DATA:-outputs/data/cifar10-full.bin}
EPOCHS=${EPOCHS:-200}
TRAIN_S=${TRAIN_S:-390}
COMPILE=${COMPILE:-auto}
PROBE_STEPS=${PROBE_STEPS:-60}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)

if [ -d outputs/whl ] && ! $PY -c "import hydra, omegaconf, fast_tsp" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site outputs/whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
[ -f "$BASE" ] || { echo "neumeta_paper.sh: base model $BASE not found (carry it)" >&2; exit 2; }

if [ "$DRY" = "1" ]; then  # CPU, embedded mini data, a handful of steps
  DEV=cpu
  DATA_ARGS=(data=cifar10_mini data.train_subset=256 data.val_size=64 data.test_subset=200
             data.batch_size=64 data.eval_batch_size=200)
  FIT_ARGS=(trainer.accelerator=cpu trainer.precision=32-true trainer.max_steps=8
            task.eval_k=2 task.sweep.k=2
            task.sweep.every_n_epochs=0 callbacks.progress_bar=null)
  EVAL_ARGS=(sweep.k=2 data.test_subset=200)
  PROBE_ARGS=(--device cpu --batch 8 --steps 1 --warm 1 --no-compile)
  EPOCHS=1 WARMUP=3 RAMP=2
else
  DEV=cuda
  [ -f "$DATA" ] || { echo "neumeta_paper.sh: data pack $DATA not found (carry it)" >&2; exit 2; }
  DATA_ARGS=(data=cifar10 data.root=$DATA)
  FIT_ARGS=(trainer=gpu trainer.precision=32-true)
  EVAL_ARGS=()
  PROBE_ARGS=(--device cuda --batch 64 --steps "$PROBE_STEPS" --warm 5)
  [ "$COMPILE" = "0" ] && PROBE_ARGS+=(--no-compile)
fi

# ---- 2. probe: steps/s eager vs compiled (random weights, the paper's INR and batch)
$PY - "${PROBE_ARGS[@]}" >"$OUT/probe.json" 2>"$OUT/probe.log" <<'EOF' || true
import argparse, json, sys, time
import torch
from metamorph.cli.bench_steps import metamorph_step, plain_step
from metamorph.hypernet.compiled import CompileConfig
from metamorph.hypernet.inr import INRConfig
ap = argparse.ArgumentParser()
ap.add_argument("--device"); ap.add_argument("--batch", type=int); ap.add_argument("--steps", type=int)
ap.add_argument("--warm", type=int, default=5); ap.add_argument("--no-compile", action="store_true")
a = ap.parse_args()
dev = torch.device(a.device)
torch.set_float32_matmul_precision("high")  # TF32 on a GPU, as metamorph-train sets it
paper = INRConfig(hidden=512, layers=8, freqs=32)
def rate(step, warm):
    for _ in range(warm): step()
    if dev.type == "cuda": torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(a.steps): step()
    if dev.type == "cuda": torch.cuda.synchronize()
    return a.steps / (time.perf_counter() - t)
out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "batch": a.batch}
out["plain_steps_per_s"] = rate(plain_step("resnet20", a.batch, dev), a.warm)
out["eager_steps_per_s"] = rate(metamorph_step("resnet20", "last_block", a.batch, dev, inr=paper), a.warm)
modes = [] if a.no_compile else ["default"] + (["reduce-overhead"] if dev.type == "cuda" else [])
for mode in modes:
    try:
        t = time.perf_counter()
        cfg = CompileConfig(enabled=True, mode=mode)
        step = metamorph_step("resnet20", "last_block", a.batch, dev, compile_cfg=cfg, inr=paper)
        step()  # compiles
        out[f"compile_s[{mode}]"] = time.perf_counter() - t
        out[f"compiled_steps_per_s[{mode}]"] = rate(step, a.warm)
    except Exception as e:  # report, never hide: the run then trains eagerly
        out[f"compiled_error[{mode}]"] = f"{type(e).__name__}: {e}"[:500]
print(json.dumps(out))
EOF
cat "$OUT/probe.json" || true
read -r MODE RATE < <($PY - "$OUT/probe.json" "$COMPILE" <<'EOF'
import json, sys
try:
    p = json.load(open(sys.argv[1]))
except Exception:
    p = {}
best, rate = "eager", p.get("eager_steps_per_s", 0.0)
if sys.argv[2] != "0":
    for k, v in p.items():
        if k.startswith("compiled_steps_per_s[") and v > rate:
            best, rate = k[len("compiled_steps_per_s["):-1], v
print(best, rate)
EOF
)
echo "probe: training with $MODE (${RATE} steps/s on random weights)"

# ---- 3. train, time-boxed; epochs cut to what fits (milestones scaled) when 200 do not
STEPS_PER_EPOCH=704  # 45,000 training images (5,000 held out for validation) at batch 64
if [ "$DRY" != "1" ]; then
  FIT=$($PY -c "r=float('$RATE') * 0.8; print(max(1, min($EPOCHS, int(r * $TRAIN_S / $STEPS_PER_EPOCH))))")
  if [ "$FIT" -lt "$EPOCHS" ]; then
    echo "probe: $EPOCHS epochs do not fit in ${TRAIN_S}s at ~$RATE steps/s: training $FIT epochs"
    EPOCHS=$FIT
  fi
fi
M1=$(( EPOCHS / 2 > 0 ? EPOCHS / 2 : 1 )); M2=$(( EPOCHS * 3 / 4 > M1 ? EPOCHS * 3 / 4 : M1 + 1 ))
MAX_TIME=$(printf "00:%02d:%02d:%02d" $(( TRAIN_S / 3600 )) $(( TRAIN_S % 3600 / 60 )) $(( TRAIN_S % 60 )))
COMPILE_ARGS=(task.compile.enabled=false)
[ "$MODE" != "eager" ] && COMPILE_ARGS=(task.compile.enabled=true task.compile.mode=$MODE)
RUN=${RUN:-outputs/gpu/neumeta_paper_run}  # outside $OUT: only 8 files come back from there
rm -rf "$RUN"
set +e
$PY -m metamorph.cli.train experiment=neumeta/paper/resnet20_cifar10 \
  task.base="$BASE" "${DATA_ARGS[@]}" "${FIT_ARGS[@]}" "${COMPILE_ARGS[@]}" \
  trainer.max_epochs=$EPOCHS "task.scheduler.milestones=[$M1,$M2]" \
  +trainer.max_time="$MAX_TIME" task.log_every_n_steps=50 \
  task.recon_warmup_steps=${WARMUP:-1500} task.reset_optimizer_after_warmup=true \
  task.lr_ramp_steps=${RAMP:-300} task.post_warmup_lr_factor=0.03 \
  task.loss.recon_type=mse task.loss.kd=1.0 \
  export_to= hydra.run.dir="$RUN" 2>&1 | tee "$OUT/train.log"
RC=${PIPESTATUS[0]}
set -e
CKPT=$RUN/metamorph.ckpt
[ -f "$CKPT" ] || { echo "neumeta_paper.sh: training wrote no checkpoint (exit $RC)" >&2; exit 3; }

# ---- 4. evaluate: every ratio, K from the checkpoint (the paper: K = 100)
$PY -m metamorph.cli.evaluate src="$CKPT" "${DATA_ARGS[@]}" "${EVAL_ARGS[@]}" \
  out_dir="$RUN/eval" device=$DEV hydra.run.dir="$RUN/eval" 2>&1 | tee "$OUT/eval.log" || true
cp "$RUN/eval/sweep.csv" "$OUT/sweep.csv" 2>/dev/null || true
cp "$RUN/eval/sweep.md" "$OUT/sweep.md" 2>/dev/null || true

# ---- 5. the checkpoint, stripped to the EMA INR (what emission needs). The paper's INR has
# 8.2 M parameters (32.7 MB in fp32), over the device tool's 16 MiB per file: it comes back in
# 15 MiB parts (cat neumeta_r20.ckpt.part-* > neumeta_r20.ckpt; sha256 in summary.json), and
# the logs and tables in one archive (at most 8 files come back)
STRIPPED=$RUN/neumeta_r20.ckpt
$PY scripts/strip_checkpoint.py "$CKPT" "$STRIPPED"
SIZE=$(stat -c %s "$STRIPPED")
SHA=$(sha256sum "$STRIPPED" | cut -d' ' -f1)
split -b 15M -d -a 1 "$STRIPPED" "$OUT/neumeta_r20.ckpt.part-"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" probe.json probe.log train.log eval.log \
  $(cd "$OUT" && ls sweep.csv sweep.md 2>/dev/null)
rm -f "$OUT/probe.log" "$OUT/train.log" "$OUT/eval.log" "$OUT/sweep.csv"
echo "{\"mode\": \"$MODE\", \"probe_steps_per_s\": $RATE, \"epochs\": $EPOCHS, \"milestones\": [$M1, $M2], \"train_exit\": $RC, \"ckpt_bytes\": $SIZE, \"ckpt_sha256\": \"$SHA\", \"wall_s\": $(( $(date +%s) - T0 ))}" | tee "$OUT/summary.json"
