"""Where a training step's CPU time goes: torch.profiler over STEPS steps of a recipe.

Sets the run up as `crosslmm train` does (`trainer.setup`, no checkpoint, probe or log
written to the recipe's folder), trains 3 steps to warm up, times STEPS more (loading
the batch apart from the step), then profiles STEPS steps and prints the ops by their own
CPU time. For the split of a step's time, not for throughput: the trainer's own
`samples_per_s` is that (docs/performance.md).

    OMP_NUM_THREADS=2 python tools/profile_train_step.py RECIPE STEPS [key=value ...]
"""
from __future__ import annotations

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from crosslmm.train import trainer
from crosslmm.train.config import load_train_config


def main() -> None:
    recipe, steps = sys.argv[1], int(sys.argv[2])
    config = load_train_config(recipe, ["output_dir=/tmp/profile_train_step", "resume=null", "probe.every=0",
                                        "save_every=0", *sys.argv[3:]])
    run = trainer.setup(config)
    run.parallel.module.train()
    meter, batches = trainer.Meter(), trainer.rank_batches(run, trainer.resume(run))
    load = step = 0.0
    for i in range(steps + 3):
        started = time.perf_counter()
        _, _, loaded = next(batches)
        loaded_at = time.perf_counter()
        trainer.train_step(run, loaded, meter)
        if i >= 3:
            load, step = load + loaded_at - started, step + time.perf_counter() - loaded_at
    print(f"per step: loading {load / steps:.3f} s, forward, backward and optimizer {step / steps:.3f} s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step(run, next(batches)[2], meter)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
