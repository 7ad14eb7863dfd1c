"""The trainer's own state, in pieces that save and load themselves (``state_dict``/``load_state_dict``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    """Counters of a run: what a checkpoint's client state records besides the data position and RNG."""

    iteration: int = 0
    """Optimizer steps taken."""
    consumed_samples: int = 0
    """Samples drawn from the data (skipped steps included)."""
    skipped_steps: int = 0
    """Micro-batches (pipelined: whole steps) skipped for a non-finite loss."""
    bad_streak: int = 0
    """Consecutive skipped ones (not saved: a resumed run starts a new streak)."""

    def state_dict(self) -> dict:
        d = asdict(self)
        d.pop("bad_streak")
        return d

    def load_state_dict(self, d: dict) -> None:
        self.iteration = int(d.get("iteration", 0))
        self.consumed_samples = int(d.get("consumed_samples", 0))
        self.skipped_steps = int(d.get("skipped_steps", 0))
        self.bad_streak = 0


class RNGState:
    """Every RNG this rank draws from (CPU, CUDA, megatron's tracker); saved per rank (``rng_rank{R}.pt``)."""

    def state_dict(self) -> dict:
        from ..checkpointing.deepspeed_io import rng_state

        return rng_state()

    def load_state_dict(self, d: dict) -> bool:
        """False when the checkpoint's generators belong to another kind of device (they are then left seeded)."""
        from ..checkpointing.deepspeed_io import set_rng_state

        return set_rng_state(d)
