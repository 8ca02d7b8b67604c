#!/usr/bin/env bash
# The README quickstart's main job, offline, on the embedded cifar10-mini:
# train a ResNet-20, make its last block metamorphic, print accuracy vs compression ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
metamorph-train experiment=quickstart/pretrain callbacks.progress_bar=null
metamorph-train experiment=quickstart/metamorph callbacks.progress_bar=null
echo "Plot: outputs/quickstart/metamorph/sweep/test.png  table: outputs/quickstart/metamorph/sweep/test.csv"
