#!/bin/bash
# The converged comparison of every row (docs/results/converged_comparison.md, "All rows"), written from the
# evaluations of the runs of runs/cpu_matrix (mse, ours, oracle), runs/cpu_matrix2 (nll, beta_nll, ours_literal) and
# runs/cpu_matrix3 (oracle_literal) and runs/cpu_matrix_lowpass (ours_lowpass, ours_lowpass_strong), linked under runs/combined; every run is done, so nothing is retrained (bundle
# experiment resumes: it would train a missing run). Run from the repository root.
set -e
for D in phantom_echo phantom_mri; do
  mkdir -p runs/combined/$D/voxelmorph
  for R in mse ours oracle; do ln -sfn "$PWD/runs/cpu_matrix/$D/voxelmorph/$R" runs/combined/$D/voxelmorph/$R; done
  for R in nll beta_nll ours_literal; do ln -sfn "$PWD/runs/cpu_matrix2/$D/voxelmorph/$R" runs/combined/$D/voxelmorph/$R; done
  ln -sfn "$PWD/runs/cpu_matrix3/$D/voxelmorph/oracle_literal" runs/combined/$D/voxelmorph/oracle_literal
  for R in ours_lowpass ours_lowpass_strong; do ln -sfn "$PWD/runs/cpu_matrix_lowpass/$D/voxelmorph/$R" runs/combined/$D/voxelmorph/$R; done
  python -m bundle experiment --data $D --loss mse ours oracle nll beta_nll ours_literal oracle_literal ours_lowpass ours_lowpass_strong --seeds 3 \
    --learning_rate 0.001 --max_epochs 8 --epoch_length 500 --lr_milestones "[6]" --out runs/combined --dry_run true \
    | grep -v -e "^\[done\]" -e "^$" && { echo "runs missing (above): train them first" >&2; exit 1; } || true
  python -m bundle experiment --data $D --loss mse ours oracle nll beta_nll ours_literal oracle_literal ours_lowpass ours_lowpass_strong --seeds 3 \
    --learning_rate 0.001 --max_epochs 8 --epoch_length 500 --lr_milestones "[6]" --out runs/combined > /dev/null
  cp runs/combined/report.md runs/combined/report_$D.md
done
