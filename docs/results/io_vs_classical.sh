#!/bin/bash
# Test-time instance optimisation of the shipped weights on the 50 test pairs of the classical comparison
# (docs/results/classical_vs_network.md), evaluated by the same evaluation (--ddf_dir) for paired tests against
# every classical tool. Run from the repository root after the classical loop of that file (it writes the 50-pair
# datalists runs/classical/<data>/<method>/ddfs/datalist.json).
set -e
export OMP_NUM_THREADS=1
for D in echo2d:phantom_echo:models mri2d:phantom_mri:models/mri2d; do
  data=${D%%:*}; rest=${D#*:}; cfg=${rest%%:*}; w=${rest#*:}
  pairs=runs/classical/$data/demons/ddfs/datalist.json
  for S in 10 50; do
    out=runs/io/$data/io$S
    mkdir -p $out
    python -m monai.bundle run --config_file configs/inference.yaml --datalist $pairs \
      --ckpt_path $w/model.pt --variance_ckpt_path $w/variance.pt --instance_steps $S --threads 1 --progress false \
      --output_dir $out/ddfs --overwrite true
    python -m monai.bundle run evaluating \
      --config_file "['configs/train.yaml','configs/variants/data/${cfg}.yaml','configs/evaluate.yaml']" \
      --ddf_dir $out/ddfs --datalist $pairs --output_dir $out --n_panels 0 --eval_name io$S \
      --meta_file configs/metadata.json --logging_file configs/logging.conf
  done
done
