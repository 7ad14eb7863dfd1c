"""Checkpoints: the folder format and atomic publish (``format``), DeepSpeed's files and private-attribute
workarounds (``deepspeed_io``), the layout-independent copy (``universal``), starting runs from checkpoints
(``restore``) and ``load_model`` for evaluation, export and tools (``load``)."""
from .format import LATEST, read_latest, tag_for
from .load import load_model, resolve_universal, vae_from_meta
from .universal import load_universal, read_meta, read_universal, save_universal

__all__ = ["LATEST", "read_latest", "tag_for", "load_model", "resolve_universal", "vae_from_meta", "load_universal",
           "read_meta", "read_universal", "save_universal"]
