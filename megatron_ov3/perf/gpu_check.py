"""The pieces of ``examples/gpu_check.sh`` that are Python: the import check, the resume-vs-straight comparison and
the ``summary.json`` of a check run (``python3 -m megatron_ov3.perf.gpu_check {facts,compare,summary} ...``).

The script is the one thing a GPU machine runs (at most 9 minutes on one H100): every part has its own time
limit and log under OUT, a failing part never stops the next, and ``summary.json`` says what each part found.
``--dry-run`` runs the same parts at tiny size on the CPU (CI does, ``tests/e2e/test_gpu_check.py``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from typing import Dict, List, Optional

RESUME_RTOL = 2e-2
"""Relative tolerance of a resumed GPU run against the straight one: GPU kernels accumulate with atomics, so a
resume cannot be bit-identical there (on the CPU it is, and the CPU tests demand it)."""

COMPARED = ("total_loss", "contrastive_loss", "caption_loss", "latent_l1", "pixel_l1")


def facts(dry_run: bool) -> Dict:
    """Versions, the device and its compute capability, and whether the CPU shim is off (it must be on a GPU)."""
    import torch

    from .. import parallel
    from ..parallel import cpu_shim

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "dry_run": dry_run}
    for mod in ("deepspeed", "megatron.core", "diffusers", "transformers", "torchao", "transformer_engine"):
        try:
            out[mod] = getattr(__import__(mod, fromlist=["__version__"]), "__version__", "?")
        except Exception as e:  # report, do not stop: the part's log says what is missing
            out[mod] = f"not importable ({type(e).__name__})"
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name(0)
        out["compute_capability"] = list(torch.cuda.get_device_capability(0))
    parallel.initialize_model_parallel(1, 1, seed=0)
    out["cpu_shim_active"] = cpu_shim.active()
    out["ok"] = bool(dry_run or (torch.cuda.is_available() and not out["cpu_shim_active"]))
    return out


def _metrics(path: str) -> List[dict]:
    return [json.loads(line) for line in open(path)]


def compare(straight: str, resumed: str, after: int = 0, rtol: float = RESUME_RTOL) -> Dict:
    """The resumed run's records after iteration ``after`` (where it resumed) against the straight run's at the
    same iterations: the largest relative difference of each loss, and whether all lie within ``rtol``."""
    ref = {r["iteration"]: r for r in _metrics(straight)}
    rows = [r for r in _metrics(resumed) if r["iteration"] in ref and r["iteration"] > after]
    worst = {k: max((abs(r[k] - ref[r["iteration"]][k]) / max(abs(ref[r["iteration"]][k]), 1e-8) for r in rows
                     if k in r), default=None) for k in COMPARED}
    within = bool(rows) and all(v is not None and v <= rtol for v in worst.values())
    return {"iterations": sorted(r["iteration"] for r in rows), "max_rel_diff": worst, "rtol": rtol, "ok": within}


def _count(path: str, pattern: str) -> Optional[int]:
    if not os.path.isfile(path):
        return None
    return len(re.findall(pattern, open(path, errors="replace").read()))


def _json(path: str) -> Optional[dict]:
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def _pytest_line(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    lines = [ln.strip("= \n") for ln in open(path, errors="replace") if re.search(r"\d+ (passed|failed|skipped)", ln)]
    return lines[-1] if lines else None


def summary(out: str) -> Dict:
    """Everything a check run found, from its parts' logs and outputs under ``out``."""
    parts = [json.loads(line) for line in open(os.path.join(out, "parts.jsonl"))] if os.path.isfile(
        os.path.join(out, "parts.jsonl")) else []
    bench = _json(os.path.join(out, "bench.json")) or {}
    res = {
        "parts": parts,
        "all_parts_ok": bool(parts) and all(p["rc"] == 0 for p in parts),
        "facts": _json(os.path.join(out, "facts.json")),
        "pytest": _pytest_line(os.path.join(out, "pytest.log")),
        "host_syncs": _json(os.path.join(out, "host_syncs.json")),
        "resume": _json(os.path.join(out, "resume.json")),
        "export_files": sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "hf", "*"))),
        "fp8_compile": {"graph_breaks": _count(os.path.join(out, "fp8_compile.log"), r"Graph break"),
                        "recompiles": _count(os.path.join(out, "fp8_compile.log"), r"Recompiling function")},
        "bench_ratios": bench.get("ratios"),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("facts", help="versions, device, CPU shim off; JSON to --output")
    f.add_argument("--output", required=True)
    f.add_argument("--dry-run", action="store_true", help="no GPU needed")
    c = sub.add_parser("compare", help="resumed vs straight metrics; JSON to --output")
    c.add_argument("straight")
    c.add_argument("resumed")
    c.add_argument("--output", required=True)
    c.add_argument("--after", type=int, default=0, help="the iteration the run resumed from")
    c.add_argument("--rtol", type=float, default=RESUME_RTOL)
    s = sub.add_parser("summary", help="summary.json of a check run's folder")
    s.add_argument("out")
    a = p.parse_args(argv)
    if a.cmd == "summary":
        print(json.dumps(summary(a.out), indent=1))
        return 0
    res = facts(a.dry_run) if a.cmd == "facts" else compare(a.straight, a.resumed, a.after, a.rtol)
    with open(a.output, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
