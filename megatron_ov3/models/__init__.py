"""OV3 model definitions: plain modules built from megatron-core ModuleSpecs."""
from .config import ConfigError, LayerImplConfig, OV3Config, TowerConfig
from .ov3 import LOSS_NAMES, OV3Model, build_model
from .sizes import SIZES, get_config
from .vae import FrozenVAE, VAEConfig, VAEDecodeConfig

__all__ = [
    "ConfigError", "LayerImplConfig", "OV3Config", "TowerConfig", "LOSS_NAMES", "OV3Model", "build_model",
    "SIZES", "get_config", "FrozenVAE", "VAEConfig", "VAEDecodeConfig",
]
