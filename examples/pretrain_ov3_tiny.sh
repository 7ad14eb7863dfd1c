#!/usr/bin/env bash
# megatron_ov3-recipe: configs/ov3_tiny.yaml num_gpus=2
# Tiny OV3 on CPU (or one small GPU): every value lives in examples/configs/ov3_tiny.yaml; same mechanism as
# pretrain_ov3_huge.sh.
#
#   DATA_PATH=... TOKENIZER=... deepspeed --num_gpus 2 examples/pretrain_ov3_tiny.sh [flags]   # 2 ranks (gloo)
#   DATA_PATH=... TOKENIZER=... bash examples/pretrain_ov3_tiny.sh [flags]                     # 2 ranks
''':'
exec "${OV3_PYTHON:-python}" "$0" --ov3-launch "$@"
':'''
import sys  # noqa: E401
from megatron_ov3.launch import recipe_main

recipe_main(__file__, sys.argv[1:])
