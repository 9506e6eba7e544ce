#!/usr/bin/env bash
# Leave-one-patient-out study on the three shared Sunnybrook patients (docs/results/sunnybrook.md). From the
# repository root, one thread per process (two processes ran side by side on the 2-core machine). Every fold trains on
# the other two patients' unlabelled pairs, chooses its checkpoint on their labelled ED->ES pairs (validation) and is
# tested once on the left-out patient's labelled ED->ES pairs (LV cavity, label 1).
set -eu
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
D=data/sunnybrook; R=runs/sunnybrook
PIDS="SCD0000101 SCD0000201 SCD0000301"
BASE="'configs/train.yaml','configs/variants/data/sunnybrook.yaml'"
[ -f $D/datalist.json ] || python -m bundle datalist --dataset sunnybrook --root ../shared/realdata/sunnybrook --out $D
train() {  # NAME PID LOSS_VARIANT PRETRAINED_DIR LR
  python -m monai.bundle run training --config_file "[$BASE,'configs/variants/loss/$3.yaml','configs/variants/schedule/finetune.yaml']" \
    --dataset_dir $D/datalist_loo_$2.json --output_dir $R/$1_$2 --learning_rate $5 --max_epochs 5 --epoch_length 200 \
    --pretrained_ckpt models/$4/model.pt --pretrained_variance_ckpt models/$4/variance.pt
}
evaluate() {  # NAME PID LOSS_VARIANT WEIGHTS_DIR
  python -m monai.bundle run evaluating --config_file "[$BASE,'configs/variants/loss/$3.yaml','configs/evaluate.yaml']" \
    --dataset_dir $D/datalist_loo_$2.json --output_dir $R/$1_$2 --ckpt_path $4/model.pt --variance_ckpt_path $4/variance.pt --n_panels 2
}
# 1. zero-shot: the shipped phantom weights
for pid in $PIDS; do
  evaluate zeroshot_mri2d $pid ours models/mri2d
  evaluate zeroshot_echo2d $pid ours models
  evaluate zeroshot_lowpass_mri2d $pid ours_lowpass_strong models/lowpass/mri2d
done
# 2. the learning rate, chosen on fold SCD0000101's validation pairs (best validation Dice in the training log)
for lr in 0.0001 0.001; do train ours_lr$lr SCD0000101 ours mri2d $lr; done
# 3. fine-tuning with the chosen rate (1e-4), three losses, every fold
for pid in $PIDS; do
  train ft_ours $pid ours mri2d 0.0001;                     evaluate ft_ours $pid ours $R/ft_ours_$pid
  train ft_mse $pid mse mri2d 0.0001;                       evaluate ft_mse $pid mse $R/ft_mse_$pid
  train ft_lowpass $pid ours_lowpass_strong lowpass/mri2d 0.0001; evaluate ft_lowpass $pid ours_lowpass_strong $R/ft_lowpass_$pid
done
# 4. classical tools, the same evaluation (ants_syn needs ANTsPy on PYTHONPATH: docs/classical.md)
for m in sitk_demons demons bspline elastix_bspline ants_syn convexadam; do for pid in $PIDS; do
  python -m scripts.classical --method $m --datalist $D/datalist_loo_$pid.json --split test --out $R/cls_${m}_$pid/ddf --threads 1
  python -m monai.bundle run evaluating --config_file "[$BASE,'configs/evaluate.yaml']" --dataset_dir $D/datalist_loo_$pid.json \
    --output_dir $R/cls_${m}_$pid --ddf_dir $R/cls_${m}_$pid/ddf --n_panels 0
done; done
# 5. field-level instance optimisation (25 steps, the inference defaults) on every fold, then the same evaluation
for row in ft_ours ft_mse ft_lowpass; do for pid in $PIDS; do
  python -m monai.bundle run --config_file configs/inference.yaml --datalist $D/datalist_loo_$pid.json --datalist_split test \
    --ckpt_path $R/${row}_$pid/model.pt --variance_ckpt_path $R/${row}_$pid/variance.pt --instance_steps 25 --threads 1 \
    --output_dir $R/fio_${row}_$pid/ddf
  python -m monai.bundle run evaluating --config_file "[$BASE,'configs/evaluate.yaml']" --dataset_dir $D/datalist_loo_$pid.json \
    --output_dir $R/fio_${row}_$pid --ddf_dir $R/fio_${row}_$pid/ddf --n_panels 0
done; done
# 6. field-IO settings on each fold's validation pairs (the training patients), then CPU per pair, every method interleaved pair by pair on fold SCD0000301's test pairs, one thread
python -m bundle instance_bench --weights $R/ft_ours_SCD0000301 --datalist $D/datalist_loo_SCD0000301.json --split test --n 0 \
  --steps 0 --field 25 --classical sitk_demons,demons,bspline,elastix_bspline,ants_syn,convexadam \
  --variants "['configs/variants/data/sunnybrook.yaml']" --threads 1
for pid in $PIDS; do
  python -m bundle instance_bench --weights $R/ft_ours_$pid --datalist $D/datalist_loo_$pid.json --split validation --n 0 \
    --steps 0 --field "25,50,25:lam=0.01,25:lam=0.05,25:weight=snr,25:grid=32" \
    --variants "['configs/variants/data/sunnybrook.yaml']" --threads 1 --json $R/field_validation_$pid.json
done
# 7. the tables: the folds pooled (28 pairs), paired t-tests against the fine-tuned network
pool() { echo "$1=$R/$2_SCD0000101+$R/$2_SCD0000201+$R/$2_SCD0000301"; }
python -m bundle compare $(pool zeroshot_mri2d zeroshot_mri2d) $(pool zeroshot_echo2d zeroshot_echo2d) \
  $(pool zeroshot_lowpass zeroshot_lowpass_mri2d) $(pool ft_mse ft_mse) $(pool ft_ours ft_ours) $(pool ft_lowpass ft_lowpass) \
  $(for r in ft_ours ft_mse ft_lowpass; do pool fio_$r fio_$r; done) \
  $(for m in sitk_demons demons bspline elastix_bspline ants_syn convexadam; do pool $m cls_$m; done) \
  --metrics dice,identity_dice,hd95,hd95_mm,asd_mm,fold_frac --reference ft_ours
# (and the same with --reference elastix_bspline / ft_mse for the other paired tests)
