"""Recipe scripts (``examples/pretrain_ov3_*.sh``): a thin shim over a config file, launched two ways.

* ``deepspeed [--hostfile H] examples/pretrain_ov3_huge.sh [flags]``: the DeepSpeed launcher runs
  ``python -u SCRIPT --local_rank=N [flags]`` on every rank; the script's Python part calls
  :func:`recipe_main`, which trains with ``--config <the recipe's file>`` plus the flags.
* ``bash examples/pretrain_ov3_huge.sh [flags]``: the script's bash part runs ``python SCRIPT --ov3-launch``;
  :func:`recipe_main` then starts the DeepSpeed launcher on the script (``HOSTFILE`` -> ``--hostfile``,
  ``NUM_GPUS`` -> ``--num_gpus``), handing it the recipe's environment overrides as flags, which every rank of
  every host receives (multi-node runners do not forward the caller's environment).
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import List, Mapping, Optional

LAUNCH = "--ov3-launch"


def env_as_flags(config: str, environ: Mapping[str, str]) -> List[str]:
    """The recipe's environment overrides that are set, as the equivalent command-line flags."""
    from .config.job import SECTIONS, env_overrides
    from .config.tree import read_file
    from .options import flag_of

    values = env_overrides(read_file(config).get("env"), environ, config)
    flags: List[str] = []
    for section, fields in values.items():
        by_name = {f.name: f for f in __import__("dataclasses").fields(SECTIONS[section])}
        for name, value in fields.items():
            flag = flag_of(by_name[name]) or f"--{name.replace('_', '-')}"
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):
                flags += [flag, *map(str, value)]
            else:
                flags += [flag, "none" if value is None else str(value)]
    return flags


def launcher_command(script: str, config: str, argv: List[str], environ: Mapping[str, str],
                     default_gpus: Optional[str] = None) -> List[str]:
    """``deepspeed [--hostfile H] [--num_gpus N] SCRIPT <env overrides as flags> <argv>``."""
    ds = shutil.which("deepspeed", path=os.path.dirname(sys.executable) + os.pathsep + environ.get("PATH", ""))
    if ds is None:
        from .errors import UsageError

        raise UsageError("the 'deepspeed' launcher is not on PATH; pip install deepspeed (or activate its venv)")
    cmd = [ds]
    if environ.get("HOSTFILE"):
        cmd += ["--hostfile", environ["HOSTFILE"]]
    gpus = environ.get("NUM_GPUS") or default_gpus
    if gpus:
        cmd += ["--num_gpus", gpus]
    return cmd + [script] + env_as_flags(config, environ) + argv


def recipe_main(script: str, config: str, argv: List[str], default_gpus: Optional[str] = None) -> None:
    """The Python half of a recipe script (see the module docstring). Does not return."""
    from .cli import run

    if argv[:1] == [LAUNCH]:
        def launch(args):
            cmd = launcher_command(script, config, args, os.environ, default_gpus)
            os.execv(cmd[0], cmd)

        sys.exit(run(launch, argv[1:]))
    from .pretrain import main

    sys.exit(run(main, ["--config", config] + argv))
