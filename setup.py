"""megatron_ov3 — training framework for OpenVision 3 unified visual encoders.

Install torch first (``pip install torch==2.13.0`` on CPU machines; your CUDA build on GPU machines):
``install_requires`` only asks for a torch range that an installed torch satisfies.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# megatron_ov3_recipes.pth runs megatron_ov3.launch.deepspeed_hook inside the `deepspeed` launcher process only
# (a one-line check of sys.argv[0] for every other process): it passes a recipe's environment overrides to every
# host as flags and checks the launch first. A .pth must sit at the root of site-packages, so both the wheel
# (build_py) and the editable install (editable_wheel) put it there.
PTH = "megatron_ov3_recipes.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)


CMDCLASS = {"build_py": BuildPyWithPth}
try:
    from setuptools.command.editable_wheel import editable_wheel

    class _StrategyWithPth:
        """Wraps setuptools' editable strategy: also writes the .pth into the editable wheel."""

        def __init__(self, inner):
            self.inner = inner

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __call__(self, wheel, files, mapping):
            self.inner(wheel, files, mapping)
            with open(PTH) as f:
                wheel.writestr(PTH, f.read())

    class EditableWheelWithPth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _StrategyWithPth(super()._select_strategy(*args, **kwargs))

    CMDCLASS["editable_wheel"] = EditableWheelWithPth
except ImportError:  # setuptools < 64: no PEP 660 editable installs
    pass

setup(
    name="megatron_ov3",
    version="0.1.0",
    description="OpenVision 3 unified visual encoders on megatron-core, Transformer Engine and DeepSpeed ZeRO",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ov3", "megatron_ov3.*"]),
    package_data={"megatron_ov3.eval": ["data/*.tsv", "data/*.txt"]},
    cmdclass=CMDCLASS,
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
        # the Recap-DataComp download path (examples/download_recap_datacomp.sh) and its offline test
        "data": ["img2dataset>=1.45", "pyarrow"],
    },
)
