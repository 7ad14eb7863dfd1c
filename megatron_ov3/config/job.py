"""The job configuration: one typed tree for a training run, merged defaults <- config file <- flags.

Sections (each a dataclass, each field documented; flagged fields are Megatron-LM-named options):

============  ==============================================================================================
``model``     :class:`~megatron_ov3.models.config.OV3Config` (the size's registry config, then overrides)
``layers``    :class:`~megatron_ov3.models.config.LayerImplConfig` (backend, attention, bf16, FP8, SP, ...)
``vae``       :class:`~megatron_ov3.models.vae.VAEConfig`
``data``      :class:`~megatron_ov3.data.pipeline.DataConfig`
``train``     :class:`TrainConfig` (batch, schedule length, seed)
``optim``     :class:`OptimConfig`
``parallel``  :class:`ParallelConfig` (layout and ZeRO; :meth:`ParallelConfig.validate` is *the* rule set)
``checkpoint`` :class:`CheckpointConfig`
``logging``   :class:`LoggingConfig`
``eval``      :class:`EvalConfig`
============  ==============================================================================================

Values other sections own are filled once by :func:`resolve` (the data's batch size, resolution, text lengths
and seed; the model's vocabulary from the tokenizer), so no value is stated twice. ``--dry-run`` prints the
resolved tree as JSON; every checkpoint stores it (``job_config.json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from ..data.pipeline import DataConfig
from ..errors import UsageError
from ..models.config import LayerImplConfig, OV3Config
from ..models.sizes import SIZES, get_config
from ..models.vae import VAEConfig
from ..options import check_numbers, cli
from . import tree as T


@dataclass
class TrainConfig:
    """Batch arithmetic, schedule length and the run's seed."""

    micro_batch_size: Optional[int] = field(default=None, metadata=cli())
    """Samples per forward/backward on one data-parallel rank (required)."""
    global_batch_size: Optional[int] = field(default=None, metadata=cli())
    """Samples per optimizer step over all ranks; accumulation = global / (micro x data-parallel size)."""
    train_iters: Optional[int] = field(default=None, metadata=cli())
    """Optimizer steps to train (give this or train_samples)."""
    train_samples: Optional[int] = field(default=None, metadata=cli())
    """Samples to train; iterations = ceil(samples / global batch)."""
    seed: int = field(default=1234, metadata=cli())
    """Seed of initialisation, data order, augmentation and decoder noise."""
    max_bad_steps: int = field(default=10, metadata=cli())
    """Stop after this many consecutive non-finite losses."""
    exit_interval: Optional[int] = field(default=None, metadata=cli())
    """Save (with --save) and exit 0 after an iteration divisible by this (the schedule is unchanged)."""
    contrastive_global_batch: bool = field(default=True, metadata=cli())
    """With gradient accumulation, compute the contrastive loss over the whole global batch, as OpenVision does
    in one step (open_clip's --accum-freq): a no-grad forward of the towers over every micro-batch of the step
    first (its share of the step time is logged as ``contrastive_pool_share``), then each micro-batch's loss
    uses its own embeddings with gradients and the cached ones of the rest. --no-contrastive-global-batch: each
    micro-batch's loss sees only its micro-batch (x the data-parallel size). Pipeline parallelism included."""

    def validate(self) -> None:
        if self.micro_batch_size is None or self.global_batch_size is None:
            raise UsageError("give --micro-batch-size and --global-batch-size")
        if self.micro_batch_size < 1 or self.global_batch_size < 1:
            raise UsageError("--micro-batch-size and --global-batch-size must be >= 1")
        if (self.train_iters is None) == (self.train_samples is None):
            raise UsageError("give exactly one of --train-iters and --train-samples")
        if any(v is not None and v < 1 for v in (self.train_iters, self.train_samples)):
            raise UsageError("--train-iters / --train-samples must be >= 1")
        if self.max_bad_steps < 1:
            raise UsageError("--max-bad-steps must be >= 1")
        if self.exit_interval is not None and self.exit_interval < 1:
            raise UsageError("--exit-interval must be >= 1")

    def total_iters(self) -> int:
        return self.train_iters or -(-self.train_samples // self.global_batch_size)


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr`` (the OpenVision recipe)."""

    lr: float = field(default=5e-4, metadata=cli(low=0, low_open=True))
    """Peak learning rate."""
    min_lr: float = field(default=0.0, metadata=cli(low=0))
    """Learning rate at the end of the cosine decay."""
    lr_warmup_iters: int = field(default=0, metadata=cli(low=0))
    """Iterations of linear warmup from 0."""
    weight_decay: float = field(default=0.2, metadata=cli(low=0))
    """AdamW weight decay on the parameters the model does not exempt (see OV3Model.no_weight_decay)."""
    adam_beta1: float = field(default=0.9, metadata=cli(low=0, high=1, high_open=True))
    """AdamW beta1."""
    adam_beta2: float = field(default=0.95, metadata=cli(low=0, high=1, high_open=True))
    """AdamW beta2."""
    adam_eps: float = field(default=1e-8, metadata=cli(low=0, low_open=True))
    """AdamW epsilon."""
    clip_grad: float = field(default=1.0, metadata=cli(low=0))
    """Clip the global gradient norm to this (DeepSpeed gradient_clipping; 0: off)."""

    def validate(self) -> None:
        """Across fields only: each value's own range is declared on it (checked by ``check_numbers``)."""
        if self.min_lr > self.lr:
            raise UsageError(f"--min-lr {self.min_lr} exceeds --lr {self.lr}; need 0 <= --min-lr <= --lr")


@dataclass
class BatchPlan:
    """The batch arithmetic of a layout: global = micro x data-parallel size x accumulation."""

    micro_batch_size: int
    global_batch_size: int
    data_parallel_size: int
    grad_accum: int


@dataclass
class ParallelConfig:
    """How the world is split: TP x PP x DP, and how ZeRO shards the optimizer over DP."""

    tensor_model_parallel_size: int = field(default=1, metadata=cli())
    """Tensor-parallel size (megatron-core column/row-parallel linears; keep it within a node)."""
    pipeline_model_parallel_size: int = field(default=1, metadata=cli())
    """Pipeline stages (megatron-core 1F1B schedule; the encoder's layers are split over them)."""
    zero_stage: int = field(default=1, metadata=cli(choices=(0, 1, 2, 3)))
    """DeepSpeed ZeRO stage over the data-parallel group."""
    overlap_grad_reduce: bool = field(default=False, metadata=cli())
    """Overlap ZeRO-1/2 gradient reduction with backward (DeepSpeed overlap_comm; ignored under pipelining)."""
    distributed_timeout_minutes: int = field(default=10, metadata=cli())
    """A collective that waits longer than this (e.g. for a host that died) fails and stops the job."""

    def validate(self, world: int, model: Optional[OV3Config] = None,
                 layers: Optional[LayerImplConfig] = None) -> int:
        """The one rule set for parallel layouts (training, planner and measured mode call it). Returns the
        data-parallel size; raises :class:`UsageError` naming the fix."""
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise UsageError("parallel sizes must be >= 1")
        if self.distributed_timeout_minutes < 1:
            raise UsageError("--distributed-timeout-minutes must be >= 1")
        if world % (tp * pp):
            raise UsageError(f"{world} processes are not divisible by TP {tp} x PP {pp}; change the sizes")
        if pp > 1 and self.zero_stage > 1:
            raise UsageError(f"--zero-stage {self.zero_stage} cannot be combined with pipeline parallelism "
                             f"(DeepSpeed refuses ZeRO-2/3 with pipelining); use --zero-stage 1")
        if pp > 1 and self.zero_stage == 0:
            raise UsageError("--zero-stage 0 cannot be combined with pipeline parallelism (DeepSpeed's ZeRO-0 "
                             "gradient clipping counts only the first stage's replicated parameters); use "
                             "--zero-stage 1")
        if model is not None and model.freeze_encoder and pp > 1:
            raise UsageError("--freeze-encoder trains the decoder only; run it without pipeline parallelism "
                             "(--pipeline-model-parallel-size 1; the decoder fits one stage)")
        if model is not None and model.encoder.depth < pp:
            raise UsageError(f"--pipeline-model-parallel-size {pp} exceeds the encoder's {model.encoder.depth} "
                             f"layers; use at most {model.encoder.depth} stages")
        if model is not None and tp > 1:
            self._check_tensor_parallel(model, tp)
        if layers is not None and layers.sequence_parallel:
            self._check_sequence_parallel(model, tp)
        return world // (tp * pp)

    @staticmethod
    def _check_tensor_parallel(model: OV3Config, tp: int) -> None:
        """Every tower's heads and MLP width split evenly over the tensor-parallel ranks (megatron-core's rule)."""
        for name in ("encoder", "decoder", "text", "caption"):
            tower = getattr(model, name)
            for what, n in (("heads", tower.heads), ("mlp", tower.mlp)):
                if n % tp:
                    raise UsageError(f"--tensor-model-parallel-size {tp} does not divide the {name}'s {n} {what}; "
                                     f"use a TP size that divides every tower's heads (or another --model-size)")

    @staticmethod
    def _check_sequence_parallel(model: Optional[OV3Config], tp: int) -> None:
        if tp == 1:
            raise UsageError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if model is None:
            return
        for what, n in (("encoder", model.seq_length), ("decoder", model.num_patches)):
            if n % tp:
                raise UsageError(f"--sequence-parallel: the {what}'s {n} tokens are not divisible by "
                                 f"--tensor-model-parallel-size {tp}; adjust --register-tokens or --image-size")

    def is_valid(self, world: int, model: Optional[OV3Config] = None) -> bool:
        try:
            self.validate(world, model)
        except UsageError:
            return False
        return True

    def batch_plan(self, train: TrainConfig, world: int) -> BatchPlan:
        dp = world // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)
        mb, gb = train.micro_batch_size, train.global_batch_size
        if gb % (mb * dp):
            raise UsageError(f"--global-batch-size {gb} is not divisible by --micro-batch-size {mb} x "
                             f"data-parallel size {dp}; use a multiple of {mb * dp}")
        return BatchPlan(mb, gb, dp, gb // (mb * dp))


@dataclass
class CheckpointConfig:
    """Where checkpoints go, where a run starts from, and what a checkpoint holds."""

    save: Optional[str] = field(default=None, metadata=cli())
    """Checkpoint directory (iter_N folders and 'latest')."""
    load: Optional[str] = field(default=None, metadata=cli())
    """Resume from this checkpoint directory (its 'latest'): weights, optimizer, schedule, data position, RNG.
    A folder with no checkpoint yet starts the run fresh (or from --finetune-from / --init-universal), so the
    same command (--load = --save) starts and resumes a job."""
    save_interval: Optional[int] = field(default=None, metadata=cli())
    """Save every N iterations (and always at the end)."""
    keep_last: Optional[int] = field(default=None, metadata=cli())
    """Keep only the newest N checkpoints."""
    finetune_from: Optional[str] = field(default=None, metadata=cli())
    """Stage 2: start from this checkpoint's model weights at a new resolution (iteration, optimizer, scheduler
    and data position reset)."""
    keep_optimizer: bool = field(default=False, metadata=cli())
    """With --finetune-from: also restore the optimizer state (Adam moments)."""
    init_universal: Optional[str] = field(default=None, metadata=cli())
    """Initialise the model weights from a universal checkpoint folder (e.g. an open_clip import)."""
    save_universal: bool = field(default=False, metadata=cli())
    """Also write the layout-independent universal copy at every save (rank 0, after the save; costs 12
    bytes/parameter). Off: it is made from DeepSpeed's files on demand, when a run resumes at another
    TP/PP/DP/ZeRO or an export reads the checkpoint (``tools/checkpoint.py to-universal`` makes it ahead)."""

    def validate(self) -> None:
        if self.save_interval is not None and self.save_interval < 1:
            raise UsageError("--save-interval must be >= 1")
        if self.save_interval and not self.save:
            raise UsageError("--save-interval needs --save DIR")
        if self.keep_last is not None and self.keep_last < 1:
            raise UsageError("--keep-last must be >= 1")
        if self.finetune_from and self.init_universal:
            raise UsageError("--finetune-from and --init-universal are exclusive")
        for flag, path in (("--load", self.load), ("--save", self.save), ("--finetune-from", self.finetune_from)):
            if path and os.path.isfile(path):
                raise UsageError(f"{flag} {path!r} is a file; give the checkpoint folder (the one holding 'latest')")
        if self.keep_optimizer and not self.finetune_from:
            raise UsageError("--keep-optimizer only applies with --finetune-from")


@dataclass
class LoggingConfig:
    """What is logged where: console always (rank 0), optionally JSON lines, TensorBoard and wandb."""

    log_interval: int = field(default=10, metadata=cli())
    """Log every N iterations (and at the last one)."""
    tensorboard_dir: Optional[str] = field(default=None, metadata=cli())
    """TensorBoard event folder (rank 0)."""
    metrics_file: Optional[str] = field(default=None, metadata=cli())
    """Append one JSON line per logged iteration (rank 0); the schema is training/metrics.py's."""
    wandb_project: Optional[str] = field(default=None, metadata=cli())
    """Log to wandb (offline unless WANDB_MODE says otherwise)."""

    def validate(self) -> None:
        if self.log_interval < 1:
            raise UsageError("--log-interval must be >= 1")


@dataclass
class EvalConfig:
    """In-training evaluation on held-out shards (reconstruction, retrieval, zero-shot)."""

    eval_data_path: Optional[str] = field(default=None, metadata=cli())
    """Held-out image shards."""
    eval_interval: Optional[int] = field(default=None, metadata=cli())
    """Evaluate every N iterations."""
    eval_batches: int = field(default=10, metadata=cli())
    """Micro-batches per evaluation and rank."""
    eval_classnames: Optional[str] = field(default=None, metadata=cli())
    """Zero-shot classes of the held-out shards' KEY.cls labels: 'imagenet' (the shipped 1000 names, with CLIP's
    80 templates) or a file of names, line i = label i."""

    def validate(self, data: DataConfig) -> None:
        if self.eval_interval is not None and self.eval_interval < 1:
            raise UsageError("--eval-interval must be >= 1")
        if self.eval_interval and not self.eval_data_path:
            raise UsageError("--eval-interval needs --eval-data-path")
        if self.eval_data_path and not data.tokenizer:
            raise UsageError("--eval-data-path needs --tokenizer")


SECTIONS: Dict[str, type] = {
    "model": OV3Config, "layers": LayerImplConfig, "vae": VAEConfig, "data": DataConfig, "train": TrainConfig,
    "optim": OptimConfig, "parallel": ParallelConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig,
    "eval": EvalConfig,
}
TITLES = {"model": "model", "layers": "layers and precision", "vae": "frozen VAE", "data": "data",
          "train": "batch and schedule", "optim": "optimizer", "parallel": "parallelism",
          "checkpoint": "checkpointing", "logging": "logging", "eval": "evaluation"}
# filled by resolve() from the section that owns the value; a file setting them is told where they live
DERIVED = {("data", "micro_batch_size"): "train.micro_batch_size", ("data", "image_size"): "model.image_size",
           ("data", "seed"): "train.seed", ("data", "text_length"): "model.text_context_length",
           ("data", "caption_length"): "model.caption_length", ("data", "contrastive_texts"): "model.contrastive_texts"}


@dataclass
class JobConfig:
    """A whole training job: every section of :data:`SECTIONS`, resolved."""

    model: OV3Config
    layers: LayerImplConfig
    vae: VAEConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    parallel: ParallelConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    eval: EvalConfig

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def validate(self, world: int) -> BatchPlan:
        """Every check that needs no model and no process group; returns the batch plan for ``world``."""
        for section in (self.train, self.optim, self.checkpoint, self.logging, self.vae):
            section.validate()
        self.eval.validate(self.data)
        if self.checkpoint.save:
            from ..checkpointing.format import check_save_folder

            check_save_folder(self.checkpoint.save, (self.logging.tensorboard_dir, self.logging.metrics_file))
        if not self.data.mock_data and not (self.data.data_path and self.data.tokenizer):
            raise UsageError("give --data-path and --tokenizer (or --mock-data)")
        self.parallel.validate(world, self.model, self.layers)
        return self.parallel.batch_plan(self.train, world)


def resolve_model(raw: Mapping[str, Any], vocab: Optional[int] = None) -> OV3Config:
    """The model section: the size's registry config (``size``, default tiny), then the given fields."""
    values = dict(raw)
    size = values.pop("size", "tiny")
    if size not in SIZES:
        raise UsageError(f"--model-size {size!r} is unknown; choose one of {', '.join(SIZES)}")
    base = get_config(size).to_dict()
    for tower in ("encoder", "decoder", "text", "caption"):  # a file may change one tower field
        if isinstance(values.get(tower), dict):
            values[tower] = dict(base[tower], **values[tower])
    base.update(values)
    if vocab is not None and "vocab_size" not in raw:
        base["vocab_size"] = vocab
    return OV3Config.from_dict(base)


def resolve(raw: Mapping[str, Mapping[str, Any]], where: str = "configuration",
            tokenizer_vocab: bool = True) -> JobConfig:
    """Build the typed tree from merged ``{section: {field: value}}``; derived values filled once here."""
    T.check_keys(SECTIONS, raw, where)
    for (section, name), owner in DERIVED.items():
        if name in raw.get(section, {}):
            raise UsageError(f"{where}: {section}.{name} is set from {owner}; set that instead")
    for section, values in raw.items():
        T.check_types(SECTIONS[section], values, where)
    data_raw = raw.get("data", {})
    vocab = None
    if tokenizer_vocab and data_raw.get("tokenizer"):
        from ..data.tokenizer import Tokenizer

        vocab = Tokenizer(data_raw["tokenizer"]).vocab_size
    model = resolve_model(raw.get("model", {}), vocab)
    train = TrainConfig(**raw.get("train", {}))
    data = DataConfig(**data_raw, micro_batch_size=train.micro_batch_size or 1, image_size=model.image_size,
                      seed=train.seed, text_length=model.text_context_length, caption_length=model.caption_length,
                      contrastive_texts=model.contrastive_texts)
    job = JobConfig(model=model, layers=LayerImplConfig(**raw.get("layers", {})), vae=VAEConfig(**raw.get("vae", {})),
                    data=data, train=train, optim=OptimConfig(**raw.get("optim", {})),
                    parallel=ParallelConfig(**raw.get("parallel", {})),
                    checkpoint=CheckpointConfig(**raw.get("checkpoint", {})),
                    logging=LoggingConfig(**raw.get("logging", {})), eval=EvalConfig(**raw.get("eval", {})))
    for section in SECTIONS:
        check_numbers(getattr(job, section))  # finite and in each field's declared range, flags and files alike
    return job


def build_parser(prog: str = "python -m megatron_ov3.pretrain") -> argparse.ArgumentParser:
    """The training parser: ``--config``, ``--dry-run`` and one flag per flagged field of every section."""
    from ..cli import Parser

    p = Parser(prog=prog, description="Pre-train an OpenVision 3 encoder (megatron-core layers, DeepSpeed ZeRO). "
                                      "Values merge: defaults <- --config file <- flags.")
    g = p.add_argument_group("job")
    g.add_argument("--config", default=None, help="YAML or TOML file of sections (model:, train:, ...), e.g. "
                                                  "examples/configs/ov3_huge.yaml")
    g.add_argument("--dry-run", action="store_true", help="validate everything, print the resolved "
                                                          "configuration as JSON and exit 0")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the DeepSpeed launcher")
    for name, cls in SECTIONS.items():
        T.add_flags(p, name, cls, TITLES[name])
    return p


def env_overrides(spec: Mapping[str, Any], environ: Mapping[str, str], where: str) -> Dict[str, Dict[str, Any]]:
    """A recipe's ``env:`` section -> ``{section: {field: value}}`` from the variables that are set.

    Each entry is ``VAR: section.field`` or ``VAR: {field: section.field, required: "message"}``; a required
    variable that is unset (and not given as a flag either) is reported by :func:`check_required`."""
    out: Dict[str, Dict[str, Any]] = {}
    for var, entry in (spec or {}).items():
        target = entry["field"] if isinstance(entry, dict) else entry
        section, _, name = str(target).partition(".")
        if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            raise UsageError(f"{where}: env {var} names {target!r}, which is not a configuration field")
        if environ.get(var):
            try:
                out.setdefault(section, {})[name] = T.parse_text(SECTIONS[section], name, environ[var])
            except UsageError as e:
                raise UsageError(f"environment variable {var}={environ[var]!r}: {e}") from None
    return out


def check_required(spec: Mapping[str, Any], merged: Mapping[str, Mapping[str, Any]]) -> None:
    """The recipe's required environment variables whose field is still unset: their message, one line."""
    for var, entry in (spec or {}).items():
        if isinstance(entry, dict) and entry.get("required"):
            section, _, name = entry["field"].partition(".")
            if merged.get(section, {}).get(name) is None:
                raise UsageError(f"{var}: {entry['required']}")


def raw_job(argv: Optional[List[str]] = None, environ: Optional[Mapping[str, str]] = None) -> tuple:
    """(merged ``{section: {field: value}}``, namespace): defaults <- file <- its env overrides <- flags."""
    ns = build_parser().parse_args(argv)
    file_values = dict(T.read_file(ns.config)) if ns.config else {}
    env_spec = file_values.pop("env", None)
    where = ns.config or "flags"
    T.check_keys(SECTIONS, file_values, where)
    env_values = env_overrides(env_spec, os.environ if environ is None else environ, where)
    merged = T.interpolate(T.merge(file_values, env_values, T.cli_overrides(ns)))
    check_required(env_spec, merged)
    return merged, ns


def parse_job(argv: Optional[List[str]] = None, environ: Optional[Mapping[str, str]] = None) -> tuple:
    """(JobConfig, parsed namespace) from the command line, its ``--config`` file and the file's env overrides."""
    merged, ns = raw_job(argv, environ)
    return resolve(merged, where=ns.config or "flags"), ns


def job_from_dict(d: Mapping[str, Any]) -> JobConfig:
    """A JobConfig from its :meth:`JobConfig.to_dict` (e.g. a checkpoint's ``job_config.json``); the saved
    values are complete, so the tokenizer is not consulted."""
    from ..models.config import saved_config

    raw = {s: {k: v for k, v in vals.items() if (s, k) not in DERIVED} for s, vals in d.items()}
    legacy_text = raw.get("data", {}).pop("text_encoder_caption", None)  # a data option before 2026-12-08
    if raw.get("model"):
        raw["model"] = saved_config(raw["model"])
        if legacy_text:
            raw["model"].setdefault("contrastive_texts", legacy_text)
    return resolve(raw, where="saved job configuration", tokenizer_vocab=False)


def world_size() -> int:
    """The number of processes of this launch (the launcher's variables; 1 when nothing launched us)."""
    from ..parallel import adopt_launcher_env

    adopt_launcher_env()
    return int(os.environ.get("WORLD_SIZE", "1"))
