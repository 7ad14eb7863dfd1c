"""Entry point: ``python -m megatron_ov3.pretrain [flags]`` (one process per rank; DeepSpeed/torchrun launch it).

``--help`` lists the flags by group; usage errors exit with code 2 and a one-line message.
"""
import sys

from .cli import run


def main(argv=None) -> int:
    from .training.arguments import build_parser
    from .training.train import run as train

    args = build_parser().parse_args(argv)
    return train(args)


if __name__ == "__main__":
    sys.exit(run(main))
