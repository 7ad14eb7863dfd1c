"""Host synchronisations of a training step, counted: what a GPU step must not pay for, proven on the CPU.

Every call that reads a tensor's value into Python (``item``, ``tolist``, ``float``, ``int``, ``bool``, ``numpy``,
``cpu``) waits for the device on a GPU. The trainer runs one real iteration (micro-batch 2 x accumulation 2,
ZeRO-1) in this process with those calls counted; the decoder-noise seeds are host tensors by design
(``training/step.HOST_KEYS``: ``to_device`` leaves them where the loader put them) and are not counted.
"""
import collections
import os
import traceback

import pytest
import torch

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def counted(monkeypatch):
    """Counter of value reads by (where, file, line) while patched; ``host`` holds the ids of host tensors."""
    from megatron_ov3.training import step

    calls, host = collections.Counter(), set()
    real_to_device = step.to_device

    def to_device(batch, device):
        host.update(id(batch[k]) for k in step.HOST_KEYS if k in batch)
        return real_to_device(batch, device)

    monkeypatch.setattr(step, "to_device", to_device)

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **kw):
            if id(self) not in host:
                frame = traceback.extract_stack(limit=3)[-2]
                where = os.path.abspath(frame.filename)
                if where.endswith(os.path.join("torch", "optim", "optimizer.py")):
                    return real(self, *a, **kw)  # torch's Adam step counter: a host tensor unless capturable
                mine = where.startswith(os.path.join(ROOT, "megatron_ov3"))
                calls[("ours" if mine else "library", os.path.basename(frame.filename), frame.lineno)] += 1
            return real(self, *a, **kw)
        return read

    def start():
        for name in READS:
            monkeypatch.setattr(torch.Tensor, name, counting(name))
    return calls, start


def test_a_micro_batch_costs_one_host_sync(counted, tmp_path, monkeypatch):
    """Ours: one read per micro-batch (``step.agree``: every rank's loss finite, any rank signalled), metrics stay on
    the device until the log interval, the decoder's seeds never reach the device. DeepSpeed's own reads at the
    optimizer step (its gradient-norm overflow checks, 3 with ZeRO-1 in 0.19) are counted and bounded; torch Adam's
    step counter is a host tensor (not capturable), read without a device wait, and not counted."""
    from megatron_ov3.config.job import parse_job
    from megatron_ov3.training import trainer as T
    from dist_utils import free_port

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext")))
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                     LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    job, _ = parse_job(["--mock-data", "--tiny-vae", "--image-size", "32", "--micro-batch-size", "2",
                        "--global-batch-size", "4", "--log-interval", "100", "--train-iters", "4"])
    tr = T.setup(job, 1)
    tr.engine.train()
    tr.train_step()  # the first step builds what is built lazily
    calls, start = counted
    start()
    assert tr.train_step()
    ours = {k: v for k, v in calls.items() if k[0] == "ours"}
    library = {k: v for k, v in calls.items() if k[0] == "library"}
    if os.environ.get("OV3_HOST_SYNCS_JSON"):  # examples/gpu_check.sh records what the GPU run counted
        import json

        with open(os.environ["OV3_HOST_SYNCS_JSON"], "w") as f:
            json.dump({"device": str(tr.device), "micro_batches": tr.plan.grad_accum,
                       "ours": sum(ours.values()), "optimizer_step_library": sum(library.values()),
                       "where": {f"{w}:{f}:{n}": c for (w, f, n), c in calls.items()}}, f, indent=1)
    assert sum(ours.values()) == tr.plan.grad_accum == 2, ours
    assert all(f == "step.py" for _, f, _ in ours), ours
    assert sum(library.values()) <= 3, library  # per optimizer step, not per micro-batch
    assert all(isinstance(v, torch.Tensor) for v in tr._sums.values())  # reduced at the log interval only
