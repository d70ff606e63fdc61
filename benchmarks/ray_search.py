"""One search on Ray actors against the same search in this process: wall time and equality (issue 20).

    python benchmarks/ray_search.py --passes 3 --actors 1,2

The default model is calibrated once (PTQ, ``--preset``, 1,000 images); then the same search
(``--candidates-per-step`` candidates proposed together, default 2) runs locally on one thread
and on Ray with each actor count given (one thread per actor, a local Ray with as many CPUs).
Prints seconds per search, the speedup over the local one and whether every loss of the history
and every final scale equals the local run's. With ``c`` candidates per step and ``e``
evaluations per visit, a visit scores ``e - 1`` candidates (the start's value is known) in
``ceil((e - 1) / c)`` rounds: the most any actor count can gain is that ratio.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import torch

from evolq.pipeline import RunConfig, prepare
from evolq.search import search


def timed_search(prepared, ptq_state: dict, config: RunConfig, **where) -> tuple[float, object, dict]:
    """Seconds of one search from the PTQ state, its result and the scales it leaves."""
    qmodel = prepared.qmodel.load_quant_state(ptq_state)
    started = time.perf_counter()
    found = search(qmodel, prepared.calib_images, prepared.selection, passes=config.passes,
                   evaluations_per_block=config.evaluations_per_block, seed=config.seed, progress=False,
                   space=config.search_space, candidates_per_step=config.candidates(), **where)
    return time.perf_counter() - started, found, {k: v.clone() for k, v in qmodel.quant_state().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="w3a4")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--evaluations-per-block", type=int, default=4)
    parser.add_argument("--candidates-per-step", type=int, default=2)
    parser.add_argument("--search-space", default="paper")
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = RunConfig(preset=args.preset, passes=args.passes, evaluations_per_block=args.evaluations_per_block,
                       candidates_per_step=args.candidates_per_step, search_space=args.search_space, threads=1)
    prepared = prepare(replace(config, optimizer="none"), progress=False)
    ptq_state = {k: v.clone() for k, v in prepared.qmodel.quant_state().items()}
    rounds = args.evaluations_per_block - 1
    print(f"{args.preset}, {args.passes} passes, {args.evaluations_per_block} evaluations per visit, "
          f"{args.candidates_per_step} candidates per step: at most "
          f"{rounds / math.ceil(rounds / args.candidates_per_step):.2f}x from parallel scoring")
    local_s, local, local_scales = timed_search(prepared, ptq_state, config)
    print(f"| where | seconds | speedup | history and scales equal to local |\n|---|---|---|---|\n"
          f"| local, 1 thread | {local_s:.1f} | 1.00 | - |", flush=True)
    import ray

    for actors in (int(a) for a in args.actors.split(",")):
        ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
        try:
            seconds, found, scales = timed_search(prepared, ptq_state, config, executor="ray", actors=actors)
        finally:
            ray.shutdown()
        equal = (found.history["value"].tolist() == local.history["value"].tolist()
                 and all(torch.equal(v, scales[k]) for k, v in local_scales.items()))
        print(f"| Ray, {actors} actor{'s' if actors > 1 else ''} | {seconds:.1f} | {local_s / seconds:.2f} | "
              f"{'yes' if equal else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
