"""Reading a finished checkpoint outside training: ``load_model(path)`` for evaluation, export and tools."""
from __future__ import annotations

import os
from typing import Optional

from ..errors import MissingFile, UsageError
from . import format as fmt
from .universal import load_universal, read_meta, universal_folder


def resolve_universal(path: str, log=print) -> str:
    """Checkpoint dir (with ``latest``), an ``iter_*`` dir, a ``universal`` dir or the folder holding one (an
    ``init_checkpoint`` output) -> the universal dir (made from DeepSpeed's files first when the checkpoint has
    none yet)."""
    from .from_deepspeed import ensure_universal

    if not os.path.exists(path):
        raise MissingFile(f"checkpoint path {path!r} does not exist")
    if not os.path.isdir(path):
        raise UsageError(f"checkpoint path {path!r} is a file; pass the run's --save folder, one of its iter_* "
                         f"folders or a universal folder")
    path = universal_folder(path)
    if os.path.isfile(os.path.join(path, "meta.json")):
        fmt.check(path)
        return path
    if os.path.isfile(os.path.join(path, fmt.LATEST)):
        path = os.path.join(path, fmt.read_latest(path))
    elif not fmt.is_tag(os.path.basename(os.path.normpath(path))):
        raise MissingFile(f"{path!r} holds no checkpoint (no 'latest' file, and it is neither an iter_* nor a "
                          f"universal folder); pass the --save folder of a run that has saved")
    return ensure_universal(path, log)


def vae_from_meta(meta: dict, vae_path: Optional[str] = None):
    """The frozen VAE a checkpoint was trained with (its recorded normalisation), or the one at ``vae_path``."""
    from ..models import FrozenVAE

    vae = meta.get("vae", {})
    kw = {k: vae.get(k) for k in ("scaling_factor", "shift_factor")}  # None: the VAE config's (FLUX) values
    if vae_path:
        return FrozenVAE.from_pretrained(vae_path, **kw)
    if vae.get("tiny"):
        return FrozenVAE.tiny(**kw)
    if vae.get("path") and os.path.isdir(vae["path"]):
        return FrozenVAE.from_pretrained(vae["path"], **kw)
    raise UsageError("the checkpoint does not say where its VAE is; pass --vae-path (local FLUX.1 VAE folder)")


def load_model(path: str, vae_path: Optional[str] = None, weights: bool = True, with_vae: bool = True):
    """The whole OV3 model of a checkpoint (any TP/PP layout, read through its universal copy) on the CPU, in
    one process: needs megatron's parallel state at TP1 x PP1 (``parallel.initialize_model_parallel(1, 1)``).
    ``weights`` False: the same architecture, untrained (a baseline). Returns ``(model, meta)``."""
    from ..models import OV3Config, build_model

    uni = resolve_universal(path)
    meta = read_meta(uni)
    if "model_config" not in meta:
        raise UsageError(f"{uni!r} has no model_config in meta.json; re-save it with this version")
    vae = vae_from_meta(meta, vae_path) if with_vae else None
    model = build_model(OV3Config.from_saved(meta["model_config"]), vae=vae)
    if weights:
        load_universal(model, uni, load_optimizer=False)
    return model, meta
