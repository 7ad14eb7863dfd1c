#!/usr/bin/env bash
# Tiny OV3 on CPU (or one small GPU): every value lives in examples/configs/ov3_tiny.yaml; same mechanism as
# pretrain_ov3_huge.sh.
#
#   DATA_PATH=... TOKENIZER=... deepspeed --num_gpus 2 examples/pretrain_ov3_tiny.sh [flags]   # 2 ranks (gloo)
#   DATA_PATH=... TOKENIZER=... bash examples/pretrain_ov3_tiny.sh [flags]                     # 2 ranks
''':'
exec "${OV3_PYTHON:-python}" "$0" --ov3-launch "$@"
':'''
import os, sys  # noqa: E401
from megatron_ov3.launch import recipe_main

recipe_main(os.path.abspath(__file__), os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ov3_tiny.yaml"), sys.argv[1:], default_gpus="2")
