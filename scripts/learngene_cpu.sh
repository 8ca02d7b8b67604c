#!/usr/bin/env bash
# Learngene Pool vs SN-Net on CIFAR-10 (ResNet family), small CPU budget, one stage at a time:
#   two auxiliary models distilled from the fine-tuned ResNet-56, the pool fine-tuned with
#   transposed-mean init, SN-Net over the fine-tuned ResNet-20 / ResNet-56 anchors with the same
#   fine-tune budget, the pool with least-squares init (ablation), and three descendant shapes
#   trained from scratch.
# Every stage prints its wall and CPU time (bash `time`: real / user / sys) and is skipped when
# its output exists (rerun to resume). AUX_STEPS / STEPS: training steps of the auxiliary
# distillations (default 150) and of every fine-tune (default 80, the same for pool and SN-Net);
# SNNET_EVAL: the SN-Net descendants evaluated on the test split (default the two anchors and two
# stitches; SNNET_EVAL=null evaluates all 25, about 40 more CPU-minutes).
#   OMP_NUM_THREADS=1 bash scripts/learngene_cpu.sh > outputs/logs/learngene_cpu.log 2>&1
set -euo pipefail
cd "$(dirname "$0")/.."
AUX_STEPS=${AUX_STEPS:-150}
STEPS=${STEPS:-80}
DATA=${DATA:-data.root=../shared/data/cifar10-jpeg}
M=outputs/models/learngene
SNNET_EVAL=${SNNET_EVAL:-[0,1,12,23]}
QUIET=("$DATA" "callbacks.progress_bar=null" "+trainer.enable_progress_bar=false")
TIMEFORMAT="[stage time] real %R s  user %U s  sys %S s"
stage() {  # stage <name> <output that marks it done> <steps> <args...>
  local name=$1 done=$2 steps=$3; shift 3
  if [ -e "$done" ]; then echo "== $name: $done exists, skipped"; return; fi
  echo "== $name ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))"
  time metamorph-train "$@" "${QUIET[@]}" "trainer.limit_train_batches=$steps"
}
stage aux_tiny6 $M/tiny6.json "$AUX_STEPS" experiment=learngene/recipe/aux_tiny6_resnet56_cifar10_cpu
stage aux_base6 $M/base6.json "$AUX_STEPS" experiment=learngene/recipe/aux_base6_resnet56_cifar10_cpu
stage pool6_ours $M/pool6.descendants.json "$STEPS" experiment=learngene/recipe/pool6_resnet56_cifar10_cpu
stage snnet $M/snnet_r20_r56.descendants.json "$STEPS" \
  experiment=learngene/recipe/snnet_resnet20_56_cifar10_cpu "task.evaluate_ids=$SNNET_EVAL"
stage pool6_lsinit $M/pool6_lsinit.descendants.json "$STEPS" experiment=learngene/ablation/pool6_lsinit
for id in 0 7 1; do
  stage scratch_$id $M/scratch_$id.done "$STEPS" experiment=learngene/ablation/pool6_scratch \
    "task.paths=[$id]" "task.probes=[$id]" "task.evaluate_ids=[$id]" name=learngene_scratch_$id \
    && touch $M/scratch_$id.done
done
echo "== all stages done ($(date -u +%H:%M:%S) UTC)"
