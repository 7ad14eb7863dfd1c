"""Training: flags -> configs, DeepSpeed engine, loop, checkpoints, FLOP accounting."""
