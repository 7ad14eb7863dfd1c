"""Export / import of trained checkpoints: Hugging Face, LLaVA-1.5 tower, RAE encoder/decoder, open_clip."""
