"""OV3 model definitions: plain modules built from megatron-core ModuleSpecs.

The configs, the size registry and the VAE config import without megatron-core (the launcher's pre-flight
check resolves a job with them); the modules (``OV3Model``, ``build_model``, ``LOSS_NAMES``) load on first use.
"""
from .config import ConfigError, LayerImplConfig, OV3Config, TowerConfig
from .sizes import SIZES, get_config
from .vae import FrozenVAE, VAEConfig, VAEDecodeConfig

_FROM_OV3 = ("LOSS_NAMES", "OV3Model", "build_model")


def __getattr__(name):
    if name in _FROM_OV3:
        from . import ov3

        return getattr(ov3, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "ConfigError", "LayerImplConfig", "OV3Config", "TowerConfig", "LOSS_NAMES", "OV3Model", "build_model",
    "SIZES", "get_config", "FrozenVAE", "VAEConfig", "VAEDecodeConfig",
]
