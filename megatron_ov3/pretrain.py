"""Entry point: ``python -m megatron_ov3.pretrain [--config FILE] [flags]`` (one process per rank; DeepSpeed or
torchrun launch it). ``--help`` lists the flags by section; ``--dry-run`` prints the resolved configuration as
JSON and exits; usage errors exit with code 2 and a one-line message."""
import sys

from .cli import run


def main(argv=None) -> int:
    from .config.job import parse_job, world_size
    from .config.tree import to_json

    job, ns = parse_job(argv)
    world = world_size()
    if ns.dry_run:
        job.validate(world)
        print(to_json(job.to_dict()))
        return 0
    from .training.trainer import run as train

    return train(job, world)


if __name__ == "__main__":
    sys.exit(run(main))
