"""In-training evaluation on held-out shards (every data-parallel rank takes its share)."""
from __future__ import annotations

import json
import os

import torch.distributed as dist


def evaluate_in_training(trainer, log) -> None:
    from megatron.core import parallel_state as ps

    from ..data import DataIterator, Tokenizer
    from ..eval import classes
    from ..eval.evaluate import evaluate, save_grid

    job, it = trainer.job, trainer.state.iteration
    if ps.get_pipeline_model_parallel_world_size() > 1:
        log("note: in-training evaluation is skipped under pipeline parallelism; run tools/evaluate.py on a checkpoint")
        return
    data_cfg = job.data.for_evaluation(job.eval.eval_data_path, num_workers=0)
    data = DataIterator(data_cfg, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    spec = job.eval.eval_classnames
    classnames = classes.classnames(spec, "--eval-classnames") if spec else None
    res = evaluate(trainer.engine.module, data, trainer.device, Tokenizer(job.data.tokenizer), classnames,
                   classes.templates(None, spec), max_batches=job.eval.eval_batches,
                   group=ps.get_data_parallel_group())
    rep = res["report"]
    log(f"evaluation at iteration {it}: " + " | ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rep.items()))
    if dist.get_rank() != 0:
        return
    trainer.metrics.add_eval(it, rep, res["grid"])
    save = job.checkpoint.save
    if save:
        os.makedirs(os.path.join(save, "eval"), exist_ok=True)
        if res["grid"] is not None:
            save_grid(res["grid"], os.path.join(save, "eval", f"grid_{it:07d}.png"))
        with open(os.path.join(save, "eval", f"report_{it:07d}.json"), "w") as f:
            json.dump(rep, f, indent=1)
