"""Data: webdataset shards -> decoded, tokenized, resumable micro-batches; shard/tokenizer/latent tools."""
from .pipeline import REASONS, DataConfig, DataIterator, ShardStream, decode_image
from .tokenizer import Tokenizer, train_tokenizer

__all__ = ["REASONS", "DataConfig", "DataIterator", "ShardStream", "decode_image", "Tokenizer", "train_tokenizer"]
