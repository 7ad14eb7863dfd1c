#!/usr/bin/env bash
# megatron_ov3-recipe: configs/ov3_huge.yaml
# OV3-H pre-training (stage 2, 256px). Every value lives in examples/configs/ov3_huge.yaml (batch arithmetic,
# environment overrides, resume); this file only launches it:
#
#   DATA_PATH=... TOKENIZER=... VAE_PATH=... deepspeed [--hostfile hosts] examples/pretrain_ov3_huge.sh [flags]
#   DATA_PATH=... TOKENIZER=... VAE_PATH=... HOSTFILE=hosts bash examples/pretrain_ov3_huge.sh [flags]
#
# Flags after the script override the recipe; the environment overrides reach every host (README "Multi-node").
# `python -m megatron_ov3.pretrain --config examples/configs/ov3_huge.yaml --dry-run` prints the resolved
# configuration. Bash and Python in one file: the DeepSpeed launcher runs `python -u THIS --local_rank=N` on each
# rank; bash hands the file to the launcher (megatron_ov3/launch.py).
''':'
exec "${OV3_PYTHON:-python}" "$0" --ov3-launch "$@"
':'''
import sys  # noqa: E401
from megatron_ov3.launch import recipe_main

recipe_main(__file__, sys.argv[1:])
