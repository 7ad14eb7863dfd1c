"""Several training runs in one launch: ``deepspeed --num_gpus N tests/distributed/layouts_worker.py RUNS.json``.

Each entry of RUNS.json is ``{"name": ..., "argv": [pretrain flags], "rewind": optional --save folder}``; every rank
runs them in order through the trainer's own ``run(job, world)``, which re-creates megatron-core's parallel state
for each layout (as megatron-core's unit tests do between cases) on the one process group of the launch. Rank 0
prints ``=== run NAME ===`` before each run, so a test can split the output per run; ``rewind`` points the folder's
``latest`` back at ``iter_0000002`` after the run (what a user does to resume from an earlier checkpoint), so a
later run of the same launch can resume from it. Why one launch for many layouts: a launch costs a Python start-up
plus torch, DeepSpeed and megatron-core imports on every rank, far more than a 3-step tiny run.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main() -> int:
    import torch.distributed as dist

    from megatron_ov3 import parallel
    from megatron_ov3.config.job import parse_job, world_size
    from megatron_ov3.training import trainer

    runs = json.load(open([a for a in sys.argv[1:] if not a.startswith("--local_rank")][0]))
    world = world_size()
    for spec in runs:
        parallel.init_distributed()
        if dist.get_rank() == 0:
            print(f"=== run {spec['name']} ===", flush=True)
        job, _ = parse_job([str(a) for a in spec["argv"]])
        rc = trainer.run(job, world)
        if rc:
            raise SystemExit(f"run {spec['name']} exited with {rc}")
        dist.barrier()
        if spec.get("rewind") and dist.get_rank() == 0:
            with open(os.path.join(spec["rewind"], "latest"), "w") as f:
                f.write("iter_0000002")
        dist.barrier()
        parallel.destroy_model_parallel()
    dist.destroy_process_group()
    from megatron_ov3.cli import release_shared_memory

    release_shared_memory()  # as every entry point does through cli.run
    return 0


if __name__ == "__main__":
    sys.exit(main())
