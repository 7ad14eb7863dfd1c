"""Starting a run from a checkpoint: exact resume, resharded resume, a new stage's weights, a universal init."""
from __future__ import annotations

import json
import os
from typing import Callable, Optional

from ..errors import MissingFile, UsageError, short_repr
from . import deepspeed_io, universal
from . import format as fmt


def current_layout(zero_stage: int) -> dict:
    from megatron.core import parallel_state as ps

    return {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_stages": ps.get_pipeline_model_parallel_world_size(),
            "data_parallel": ps.get_data_parallel_world_size(), "zero_stage": zero_stage}


def saved_layout(iter_dir: str) -> Optional[dict]:
    """The layout a checkpoint was written at (from its index, or an eager universal copy's meta)."""
    for path in (os.path.join(iter_dir, universal.INDEX), os.path.join(iter_dir, "universal", "meta.json")):
        if os.path.isfile(path):
            meta = json.load(open(path))
            return meta.get("meta", meta)
    return None


def same_layout(directory: str, tag: str, zero_stage: int) -> bool:
    meta = saved_layout(os.path.join(directory, tag))
    if meta is None:
        return True  # a checkpoint without index or universal copy: only the DeepSpeed files can be used
    return all(meta.get(k) == v for k, v in current_layout(zero_stage).items())


def universal_for(iter_dir: str, log: Callable[[str], None] = print) -> str:
    """Collective: ``iter_dir/universal``, converted from DeepSpeed's files by rank 0 first when missing (every
    rank reads the same folder, so a shared filesystem is needed, as for any resharding). A failure is raised
    as the same usage error on every rank."""
    import torch.distributed as dist

    from .from_deepspeed import ensure_universal

    holder = [None]
    if dist.get_rank() == 0:
        try:
            ensure_universal(iter_dir, log, verify=False)  # verify_shared has checked it
        except UsageError as e:
            holder[0] = str(e)
    dist.broadcast_object_list(holder, src=0)
    if holder[0]:
        raise UsageError(holder[0])
    return os.path.join(iter_dir, "universal")


def _latest(directory: str, flag: str) -> str:
    tag = fmt.read_latest(directory) if os.path.isdir(directory) else None
    if tag is None:
        raise MissingFile(f"{flag} {directory!r} holds no checkpoint ('latest' missing)")
    return tag


def verify_shared(iter_dir: str) -> None:
    """Collective: the manifest's files checked before anything is loaded, each rank a share (the bytes each
    reads shrink with the world size); any damage is the same usage error, naming the file, on every rank."""
    import torch.distributed as dist

    manifest = fmt.read_manifest(iter_dir)
    if manifest is None:
        return
    names = sorted(manifest)[dist.get_rank()::dist.get_world_size()]
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, fmt.verify(iter_dir, names))
    problems = [p for part in found for p in part]
    if problems:
        raise fmt.damaged(iter_dir, problems)


# what decides which parameters exist and their shapes (besides INIT_FIELDS below)
SHAPE_FIELDS = ("encoder", "decoder", "text", "caption", "vocab_size", "latent_channels", "patch_size")


def check_same_model(iter_dir: str, cfg, flag: str) -> None:
    """A checkpoint of another model than this run's (size, towers, vocabulary, encoder options) is one usage
    error naming both, before DeepSpeed meets mismatched tensors."""
    from ..models.config import saved_config

    path = os.path.join(iter_dir, "ov3_config.json")
    if not os.path.isfile(path):
        return
    saved, mine = saved_config(json.load(open(path))), cfg.to_dict()
    for field in SHAPE_FIELDS + tuple(INIT_FIELDS):
        if field in saved and field in mine and saved[field] != mine[field]:
            how = INIT_FIELDS.get(field) or ("--model-size" if field in SHAPE_FIELDS[:4] else f"the {field}")
            raise UsageError(f"{flag} {iter_dir} holds an OV3-{saved.get('size', '?')} model and this run builds "
                             f"OV3-{mine.get('size', '?')}: {field} is {short_repr(saved[field], 90)} there, "
                             f"{short_repr(mine[field], 90)} here; set {how} to match the checkpoint")


def _sync_lr(engine) -> None:
    """The optimizer's learning rates from the scheduler's position (loaded states carry older ones)."""
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr


def resume(engine, directory: str, zero_stage: int) -> tuple:
    """Exact resume (DeepSpeed files) when the layout is unchanged; otherwise reshard from the universal copy.
    Returns (client state, this rank's RNG states or None, how it was loaded)."""
    tag = _latest(directory, "--load")
    verify_shared(os.path.join(directory, tag))
    check_same_model(os.path.join(directory, tag), deepspeed_io.unwrap(engine).cfg, "--load")
    if same_layout(directory, tag, zero_stage):
        tag, client, rng = deepspeed_io.load(engine, directory)
        return client, rng, "same layout"
    client = universal.load_universal(engine, universal_for(os.path.join(directory, tag)))
    engine.lr_scheduler.load_state_dict(client["scheduler"])
    _sync_lr(engine)
    return client, None, (f"resharded from TP{client['tensor_parallel']} x PP{client['pipeline_stages']} x "
                    f"DP{client['data_parallel']} ZeRO-{client['zero_stage']}")


def restore_weights(engine, directory: str, zero_stage: int, keep_optimizer: bool) -> None:
    """A new stage (``--finetune-from``): the weights (and, asked, Adam's moments), never the schedule."""
    tag = _latest(directory, "--finetune-from")
    verify_shared(os.path.join(directory, tag))
    check_same_model(os.path.join(directory, tag), deepspeed_io.unwrap(engine).cfg, "--finetune-from")
    if same_layout(directory, tag, zero_stage):
        deepspeed_io.load(engine, directory, module_only=not keep_optimizer, load_optimizer=keep_optimizer,
                          load_scheduler=False)
    else:
        universal.load_universal(engine, universal_for(os.path.join(directory, tag)), load_optimizer=keep_optimizer)
    _sync_lr(engine)  # start this stage's schedule


# config fields that change which encoder parameters exist, and the flag that sets each
INIT_FIELDS = {"position_embedding_type": "--position-embedding-type", "pos_embed_ref_grid": "--pos-embed-ref-grid",
               "class_token": "--class-token", "register_tokens": "--register-tokens",
               "caption_prefix": "--caption-prefix", "decoder_noise_norm": "--decoder-noise-norm"}


def init_from_universal(model, cfg, directory: str, log: Callable[[str], None] = print) -> None:
    """``--init-universal``: weights into the bare model before ZeRO partitions anything (every stage works);
    the encoder options must match the checkpoint's (the flag that differs is named)."""
    from ..models.config import saved_config

    directory = universal.universal_folder(directory)
    fmt.check(directory)
    saved = saved_config(universal.read_meta(directory).get("model_config", {}))
    mine = cfg.to_dict()
    for field, flag in INIT_FIELDS.items():
        if field in saved and saved[field] != mine[field]:
            raise UsageError(f"--init-universal {directory} was made with {field}={saved[field]!r} but this run "
                             f"has {mine[field]!r}; set {flag} to match")
    meta = universal.load_universal(model, directory, load_optimizer=False)
    log(f"initialised weights from universal checkpoint {directory} ({meta.get('source', '')})")


def data_state_for(client: dict, dp_size: int, dp_rank: int, log: Callable[[str], None]) -> Optional[dict]:
    """This rank's saved data position (None: restart the stream, with a warning when positions exist)."""
    from ..data.elastic import merge_states

    states = client.get("data_states") or []
    merged = merge_states(states)
    if merged is not None:  # the elastic order: one layout-free position, every rank takes its streams from it
        return merged
    if len(states) == dp_size:
        return states[dp_rank]
    if states and "consumed" in (states[0] or {}):
        return {"consumed": int(client.get("consumed_samples", 0))}  # mock data: layout-independent
    log(f"warning: checkpoint has data positions for {len(states)} data-parallel ranks, this run has "
        f"{dp_size}; the data stream restarts (resume is not exact)")
    return None
