"""What does carrying the data position across a world-size change cost at scale?

1M shards, 64 ranks × 8 loader workers, every stream stopped at a random point of its pass (most inside a
window of 3 shards), reshaped to 48 ranks × 8 workers, then (from those plans, each new stream again
stopped at a random point) to 72 × 8. Times, per reshape:

  all ranks   ``carry_plans`` for the whole new world (what one process planning for everyone pays)
  one rank    ``carry_plans(ranks=[r])``: what each new rank's ``PretrainLoader.load_states_from`` pays
  state       encoding one new rank's plans into its loader state (``plan_to_json``), their JSON size, and
              parsing + decoding all old states (what ``load_states_from`` reads)

Before printing, the plan is asserted to cover the pass: the shards the old streams finished, the carried
windows' shards and the new streams' fresh shards are every shard exactly once. No I/O, no torch.

    python benchmarks/reshard_assignment.py [--shards 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import numpy as np

from data_pipeline.assignment import (
    carry_plans,
    plan_to_json,
    state_plans,
    stream_work,
)

SEED = 0


def _state(rank: int, world: int, workers: int, n: int, positions: dict[int, dict], generation: int,
           plans: dict[int, Any] | None) -> dict[str, Any]:
    return {"version": 2, "epoch": 0, "seed": SEED, "rank": rank, "world_size": world, "num_workers": workers,
            "resampled": False, "num_shards": n, "generation": generation,
            "positions": {str(w): p for w, p in positions.items()},
            "plans": None if plans is None else {"epoch": 0, "streams": {str(w): plan_to_json(p)
                                                                       for w, p in plans.items()}}}


def random_position(k: int, length: int, rng: random.Random) -> dict[str, Any]:
    """A random saved position in a stream of ``k`` carried windows, then ``length`` fresh shards read in
    windows of 3 shards (positions k, k+3, …): done, between windows (10 %), or inside one."""
    starts = list(range(k)) + list(range(k, k + length, 3))
    i = rng.randrange(len(starts) + 1)
    if i == len(starts):
        return {"pos": k + length, "item": 0, "done": True}
    pos = starts[i]
    if rng.random() < 0.1:
        return {"pos": pos, "item": 0, "done": False}
    end = pos + 1 if pos < k else min(pos + 3, k + length)
    return {"pos": pos, "item": rng.randrange(1, 60), "end": end, "done": False}


def old_world(n: int, world: int, workers: int, rng: random.Random) -> list[dict[str, Any]]:
    positions = [{w: random_position(0, len(stream_work(None, r, world, w, workers, n, 0)[0].fresh), rng)
                  for w in range(workers)} for r in range(world)]
    return [_state(r, world, workers, n, positions[r], 0, None) for r in range(world)]


def planned_world(n: int, carry, world: int, workers: int, rng: random.Random) -> list[dict[str, Any]]:
    states = []
    for r in range(world):
        plans = {w: carry.plans[(r, w)] for w in range(workers)}
        positions = {w: random_position(len(p.windows), len(p.fresh), rng) for w, p in plans.items()}
        states.append(_state(r, world, workers, n, positions, carry.generation, plans))
    return states


def finished_shards(states: list[dict[str, Any]], n: int) -> np.ndarray:
    """Pass-order shards whose windows the old streams delivered completely (before their position)."""
    out = []
    for s in states:
        plans = state_plans(s, 0)
        for w in range(s["num_workers"]):
            plan, _ = stream_work(None if plans is None else plans[w], s["rank"], s["world_size"], w,
                                  s["num_workers"], n, s["generation"])
            p = s["positions"][str(w)]
            k = len(plan.windows)
            if p.get("done"):
                out += [sh for win in plan.windows for sh in win.shards]
                out.append(np.asarray(plan.fresh, dtype=np.int64))
                continue
            out += [sh for win in plan.windows[:min(p["pos"], k)] for sh in win.shards]
            if p["pos"] > k:
                out.append(np.asarray(plan.fresh[:p["pos"] - k], dtype=np.int64))
    return np.concatenate([np.asarray(x, dtype=np.int64).ravel() for x in out]) if out else np.zeros(0, int)


def check_cover(states: list[dict[str, Any]], carry, n: int, before: np.ndarray) -> None:
    """``before`` (finished by earlier worlds) + finished by ``states`` + the plans = every shard once."""
    parts = [before, finished_shards(states, n)]
    for plan in carry.plans.values():
        parts.append(np.asarray([sh for win in plan.windows for sh in win.shards], dtype=np.int64))
        parts.append(np.asarray(plan.fresh, dtype=np.int64))
    every = np.concatenate(parts)
    counts = np.bincount(every, minlength=n)
    assert every.size == n and counts.min() == 1 and counts.max() == 1, \
        f"the plan does not cover the pass: {every.size} shard slots for {n} shards, " \
        f"counts {counts.min()}..{counts.max()}"


def measure(states: list[dict[str, Any]], world: int, workers: int, n: int, repeat: int,
            before: np.ndarray) -> tuple[Any, dict]:
    t_all, t_one, t_enc, t_parse = [], [], [], []
    carry = None
    blob = json.dumps(states)
    for _ in range(repeat):
        t0 = time.perf_counter()
        carry = carry_plans(states, world, workers)
        t_all.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mine = carry_plans(states, world, workers, ranks=[world // 2])
        t_one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        enc = {str(w): plan_to_json(mine.plans[(world // 2, w)]) for w in range(workers)}
        t_enc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        parsed = json.loads(blob)
        for s in parsed:
            state_plans(s, 0)
        t_parse.append(time.perf_counter() - t0)
    assert carry is not None and carry.plans is not None
    check_cover(states, carry, n, before)
    fig = {"all_ranks_s": statistics.median(t_all), "one_rank_s": statistics.median(t_one),
           "encode_one_rank_s": statistics.median(t_enc), "parse_old_states_s": statistics.median(t_parse),
           "one_rank_plan_json_bytes": len(json.dumps(enc)), "old_states_json_bytes": len(blob),
           "carried_windows": carry.carried_windows, "unstarted_shards": carry.unstarted_shards}
    return carry, fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n, rng = args.shards, random.Random(0)
    old = old_world(n, 64, 8, rng)
    carry, fig = measure(old, 48, 8, n, args.repeat, np.zeros(0, dtype=np.int64))
    print(f"{n} shards, 64x8 -> 48x8: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                     for k, v in fig.items()}))
    mid = planned_world(n, carry, 48, 8, rng)
    _, fig = measure(mid, 72, 8, n, args.repeat, finished_shards(old, n))
    print(f"{n} shards, 48x8 -> 72x8 (from plans): " + json.dumps(
        {k: round(v, 4) if isinstance(v, float) else v for k, v in fig.items()}))


if __name__ == "__main__":
    main()
