"""The real command line of every entry point: ``python tools/X.py --help`` and ``python -m megatron_ov3.pretrain
--help`` start, parse and exit 0, and a usage error reaches the shell as one line and exit code 2. Everything else
about the tools runs their ``main`` in-process (``run_inprocess``), which is only as good as this wiring."""
import os

import pytest

from dist_utils import one_error, run_python

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow  # one Python start-up per entry point
TOOLS = sorted(f for f in os.listdir(os.path.join(ROOT, "tools")) if f.endswith(".py") and not f.startswith("_"))


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_starts_from_the_command_line(tool):
    r = run_python(os.path.join("tools", tool), "--help", timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, (r.returncode, r.stderr[-2000:])


def test_pretrain_usage_error_reaches_the_shell_as_one_line():
    r = run_python("-m", "megatron_ov3.pretrain", "--mock-data", "--tiny-vae", "--micro-batch-size", 3,
                   "--global-batch-size", 8, "--train-iters", 1, timeout=120)
    assert "not divisible by --micro-batch-size 3" in one_error(r)
