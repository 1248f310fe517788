#!/usr/bin/env bash
# The paper's SD1.5 recipe (WaDi §4.1) on one node of 8 GPUs:
# 512 px, 16 prompts per GPU (global batch 128), lr 1e-4 (student) / 1e-2 (fake), CFG 1.5,
# LoRaD rank 256 (student) / 32 (fake), 2 epochs of the prompt file (the default), bf16, gradient checkpointing.
#
#   bash train.sh journeydb_prompts.txt [more wadi.py flags]
#
# Run it again after an interruption: it resumes from the latest checkpoint.
# One GPU: the same flags with `python wadi.py` instead of `torchrun ... wadi.py` (global batch 16, so 8x the
# steps for the same 2 epochs), e.g.
#   python wadi.py --prompts journeydb_prompts.txt --mixed_precision bf16 --gradient_checkpointing
set -euo pipefail
prompts=${1:?usage: bash train.sh PROMPTS_FILE [more wadi.py flags]}
shift
torchrun --standalone --nproc_per_node 8 wadi.py \
    --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
    --prompts "$prompts" --output_dir wadi-sd15 \
    --resolution 512 --train_batch_size 16 \
    --learning_rate 1e-4 --fake_learning_rate 1e-2 --guidance_scale 1.5 \
    --student_rank 256 --fake_rank 32 \
    --mixed_precision bf16 --gradient_checkpointing \
    --checkpointing_steps 500 --checkpoints_total_limit 3 --resume_from_checkpoint latest \
    "$@"
