"""Launching a recipe (``examples/pretrain_ov3_*.sh``) so that what the user set reaches every rank of every host.

A recipe script is a thin shim over a config file, named by its marker line ``# megatron_ov3-recipe: CONFIG``.
It is launched three ways; all three end with every rank running ``python -m megatron_ov3.pretrain --config
CONFIG <flags>`` with the *same* flags:

* ``deepspeed [--hostfile H] SCRIPT [flags]`` — DeepSpeed's multi-node runners (pdsh, openmpi, slurm, ...)
  start each host's ranks over ssh/mpirun/srun and forward only a few environment variables, so the recipe's
  environment overrides (``DATA_PATH``, ``TP``, ...) would be lost on every host. They do forward the script's
  flags. ``megatron_ov3_recipes.pth`` (installed with the package) calls :func:`deepspeed_hook` inside the
  ``deepspeed`` launcher process only; when its script is a recipe, the hook turns the overrides that are set
  into flags placed right after the script (flags the user typed come later and win), then checks the launch
  before anything starts (:func:`preflight`): the whole job resolves and validates for the hostfile's process
  count, and every host answers ssh. A problem is one line on stderr and exit code 2.
* ``bash SCRIPT [flags]`` — the script's bash half runs ``python SCRIPT --ov3-launch``, which starts the
  DeepSpeed launcher on the script (``HOSTFILE`` -> ``--hostfile``, ``NUM_GPUS`` -> ``--num_gpus``,
  ``MASTER_ADDR``/``MASTER_PORT`` -> ``--master_addr``/``--master_port``).
* on each rank (``python -u SCRIPT --local_rank=N [flags]``, what the launcher runs): :func:`recipe_main`
  trains with the recipe's config plus the flags.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import List, Mapping, Optional, Tuple

from .errors import UsageError

LAUNCH = "--ov3-launch"
MARKER = re.compile(r"^# megatron_ov3-recipe: (\S+)(?: num_gpus=(\d+))?\s*$", re.M)
ADDED = "OV3_RECIPE_FLAGS_ADDED"  # set by the bash half, which already turned the overrides into flags
_HOOKED = False


def recipe_of(script: str) -> Optional[Tuple[str, Optional[str]]]:
    """(config path, default process count) of a recipe script, or None when ``script`` is not one."""
    if not (script.endswith((".sh", ".py")) and os.path.isfile(script)):
        return None
    with open(script, errors="replace") as f:
        m = MARKER.search(f.read(8192))
    if m is None:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(script)), m.group(1)), m.group(2)


def env_as_flags(config: str, environ: Mapping[str, str]) -> List[str]:
    """The recipe's environment overrides that are set, as the equivalent command-line flags."""
    from .config.job import SECTIONS, env_overrides
    from .config.tree import read_file
    from .options import flag_of

    flags: List[str] = []
    for section, fields in env_overrides(read_file(config).get("env"), environ, config).items():
        by_name = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        for name, value in fields.items():
            flag = flag_of(by_name[name]) or f"--{name.replace('_', '-')}"
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):
                flags += [flag, *map(str, value)]
            else:
                flags += [flag, "none" if value is None else str(value)]
    return flags


# ---------------------------------------------------------------- inside the `deepspeed` launcher process
def deepspeed_hook() -> None:
    """Called by ``megatron_ov3_recipes.pth`` when the program is DeepSpeed's launcher. Never breaks a launch
    that is not a recipe's; a usage error in a recipe's launch exits 2 with one line."""
    global _HOOKED
    if _HOOKED:  # site-packages can be processed twice (lib and lib64 of a venv)
        return
    _HOOKED = True
    try:
        sys.argv[:] = prepare_launch(sys.argv, os.environ)
    except UsageError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr, flush=True)
        os._exit(2)
    except (Exception, SystemExit) as e:  # our bug must not stop DeepSpeed for any other script
        print(f"megatron_ov3: launch check skipped ({type(e).__name__}: {e})", file=sys.stderr, flush=True)


def prepare_launch(argv: List[str], environ: Mapping[str, str]) -> List[str]:
    """``deepspeed`` argv -> the argv the launcher should run: the recipe's environment overrides as flags
    after the script; then :func:`preflight`. Unchanged for scripts that are not recipes."""
    from deepspeed.launcher.runner import parse_args

    args = parse_args(argv[1:])
    recipe = recipe_of(args.user_script)
    if recipe is None:
        return list(argv)
    at = len(argv) - len(args.user_args) - 1  # the script's position
    if argv[at] != args.user_script:
        return list(argv)
    flags = [] if environ.get(ADDED) else env_as_flags(recipe[0], environ)
    if flags:
        print(f"megatron_ov3: environment overrides go to every rank as flags: {' '.join(flags)}", flush=True)
    user = flags + list(args.user_args)
    if "-h" in user or "--help" in user:
        return list(argv[:at + 1]) + user  # the ranks print the help; nothing to check
    multi = preflight(args, recipe[0], user)
    head = list(argv[:at + 1])
    if multi and args.launcher.lower() == "pdsh":
        user = [pdsh_safe(a) for a in user]
    elif multi and args.launcher.lower() == "openmpi":
        head = _openmpi_exports(head, args)
    return head + user


def _openmpi_exports(head: List[str], args) -> List[str]:
    """DeepSpeed's openmpi runner gives the ranks no MASTER_ADDR/MASTER_PORT (it expects mpi4py discovery):
    export them with ``mpirun -x`` through ``--launcher_args`` (the first host, unless --master_addr says)."""
    hosts, _ = launch_hosts(args)
    addr = args.master_addr or next(iter(hosts))
    extra = f"-x MASTER_ADDR={addr} -x MASTER_PORT={args.master_port}"
    if "--launcher_args" in head:
        i = head.index("--launcher_args")
        return head[:i + 1] + [f"{head[i + 1]} {extra}"] + head[i + 2:]
    return head[:1] + ["--launcher_args", extra] + head[1:]


def pdsh_safe(arg: str) -> str:
    """``arg`` such that it reaches the remote ranks unchanged through DeepSpeed's pdsh runner, which joins the
    arguments into one remote shell command and only wraps those containing a space in double quotes: so
    ``--data-path 'shards/{000..099}.tar'`` would be brace-expanded there. Without a space: shell-quoted; with
    one: escaped for the double quotes DeepSpeed adds."""
    if " " not in arg:
        return shlex.quote(arg)
    return arg.replace("\\", "\\\\").replace("$", "\\$").replace("`", "\\`")


def launch_hosts(args) -> Tuple[dict, bool]:
    """({host: processes}, multi-node) the DeepSpeed launcher will use for these arguments (its own functions)."""
    from deepspeed.launcher import runner

    try:
        pool = runner.fetch_hostfile(args.hostfile)
    except ValueError as e:
        raise UsageError(f"--hostfile {args.hostfile}: {e}; each line is 'HOST slots=N'") from None
    if not pool:
        return {"localhost": args.num_gpus if args.num_gpus > 0 else max(1, _local_devices())}, False
    active = runner.parse_inclusion_exclusion(pool, args.include, args.exclude)
    active = runner.apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus)
    hosts = {h: len(slots) for h, slots in active.items()}
    return hosts, (args.force_multi or len(hosts) > 1) and not args.no_ssh


def _local_devices() -> int:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_count()


def preflight(args, config: str, user_args: List[str]) -> bool:
    """Before any host starts: the job resolves and validates for the launch's process count (so a layout the
    hostfile cannot hold is one line, not an error on every rank), and every host answers ssh in time.
    Returns whether the launch is multi-node."""
    from .config.job import raw_job, resolve

    hosts, multi = launch_hosts(args)
    world = sum(hosts.values())
    flags = [a for a in user_args if not a.startswith("--local_rank")]
    merged, _ = raw_job(["--config", config] + flags, environ={})
    job = resolve(merged, where=config)
    try:
        job.validate(world)
    except UsageError as e:
        where = f"--hostfile {args.hostfile}" if multi else "this machine"
        raise UsageError(f"{world} processes ({where}: {', '.join(f'{h}={n}' for h, n in hosts.items())}): "
                         f"{e}") from None
    if multi:
        check_ssh(list(hosts), args.ssh_port, args.hostfile)
    return multi


def check_ssh(hosts: List[str], port: Optional[int], hostfile: str, timeout: float = 15.0) -> None:
    """Every host runs a command over ssh within ``timeout`` seconds (DeepSpeed checks only the first; an
    unreachable later host would leave the others waiting for it)."""
    def probe(host):
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}"] + \
              (["-p", str(port)] if port else []) + [host, "true"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return host, f"no answer in {timeout:.0f}s"
        lines = (r.stderr or "").strip().splitlines()
        return host, None if r.returncode == 0 else (lines[-1] if lines else f"ssh exit {r.returncode}")

    with ThreadPoolExecutor(max_workers=min(32, len(hosts))) as pool:
        for host, problem in pool.map(probe, hosts):
            if problem:
                raise UsageError(f"host {host} of --hostfile {hostfile} is not reachable by ssh ({problem}); "
                                 f"fix the hostfile or the host's sshd and keys")


# ---------------------------------------------------------------- the recipe script's Python half
def launcher_command(script: str, config: str, argv: List[str], environ: Mapping[str, str],
                     default_gpus: Optional[str] = None) -> List[str]:
    """``deepspeed [--hostfile H] [--num_gpus N] SCRIPT <env overrides as flags> <argv>``."""
    ds = shutil.which("deepspeed", path=os.path.dirname(sys.executable) + os.pathsep + environ.get("PATH", ""))
    if ds is None:
        raise UsageError("the 'deepspeed' launcher is not on PATH; pip install deepspeed (or activate its venv)")
    cmd = [ds]
    for var, flag in (("HOSTFILE", "--hostfile"), ("MASTER_ADDR", "--master_addr"), ("MASTER_PORT", "--master_port")):
        if environ.get(var):
            cmd += [flag, environ[var]]
    gpus = environ.get("NUM_GPUS") or (None if environ.get("HOSTFILE") else default_gpus)  # a hostfile has slots
    if gpus:
        cmd += ["--num_gpus", gpus]
    return cmd + [script] + env_as_flags(config, environ) + argv


def recipe_main(script: str, argv: List[str]) -> None:
    """The Python half of a recipe script (see the module docstring). Does not return."""
    from .cli import run

    config, default_gpus = recipe_of(script) or (None, None)
    if config is None:
        raise SystemExit(f"error: {script} has no '# megatron_ov3-recipe: CONFIG' line")
    if argv[:1] == [LAUNCH]:
        def launch(args):
            cmd = launcher_command(script, config, args, os.environ, default_gpus)
            os.execve(cmd[0], cmd, dict(os.environ, **{ADDED: "1"}))

        sys.exit(run(launch, argv[1:]))
    from .pretrain import main

    sys.exit(run(main, ["--config", config] + argv))
