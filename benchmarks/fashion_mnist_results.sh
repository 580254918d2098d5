#!/usr/bin/env bash
# The README's Fashion-MNIST results: a small convnet and a small ViT, superclass (K=3) and k-means (K=3)
# contexts, every norm, 3 seeds, on a 10 000 / 2 000 subset for CPU time. Reports land in benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
COMMON=(--dataset fashion_mnist --train-subset 10000 --test-subset 2000 --epochs 3 --seeds 0,1,2 --num-contexts 3)
for model in small_convnet small_vit; do
  baseline=bn; [ "$model" = small_vit ] && baseline=ln
  for contexts in superclass kmeans; do
    "$PYTHON" recipes/image_classification.py "${COMMON[@]}" --model "$model" --contexts "$contexts" \
      --norms "$baseline,cn,cnx,acn,mixnorm,modenorm" --output-dir "benchmarks/results/fashion_mnist/$model-$contexts"
  done
done
