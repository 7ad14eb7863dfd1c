"""megatron_ov3: training OpenVision 3 unified visual encoders on megatron-core + DeepSpeed."""
import warnings as _warnings

__version__ = "0.1.0"

# megatron-core warns at import time about every optional fused kernel it lacks; say it once, in the README.
_warnings.filterwarnings("ignore", message=".*(Apex|apex).*not installed.*")
_warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
_warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
