"""megatron_ov3 — training framework for OpenVision 3 unified visual encoders.

Install torch first (``pip install torch==2.13.0`` on CPU machines; your CUDA build on GPU machines):
``install_requires`` only asks for a torch range that an installed torch satisfies.
"""
from setuptools import find_packages, setup

setup(
    name="megatron_ov3",
    version="0.1.0",
    description="OpenVision 3 unified visual encoders on megatron-core, Transformer Engine and DeepSpeed ZeRO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ov3", "megatron_ov3.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "deepspeed>=0.16",
        "diffusers>=0.30",
        "safetensors",
        "sentencepiece>=0.2",
        "webdataset>=0.2.86",
        "braceexpand",
        "pillow",
        "numpy",
        "scipy",
        "matplotlib",
        "pyyaml",
        "tomli; python_version < '3.11'",
        "tqdm",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-timeout", "ruff>=0.6"],
        "hf": ["transformers>=4.40"],
        "wandb": ["wandb"],
        "te": ["transformer-engine[pytorch]"],
        "fp8": ["torchao>=0.13"],
    },
)
