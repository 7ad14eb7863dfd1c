"""Training: the trainer and its components (model builder, optimizer, DeepSpeed config, step, metrics, state)."""
