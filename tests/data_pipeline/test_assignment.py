"""The pure assignment functions at cluster scale (no processes, no I/O): a pass over 10,000 shards read by
64 ranks × 8 loader workers, reshaped mid-pass to 48 ranks, then to 72, delivers every sample exactly once.

The simulation reads windows with the loader's own pieces (``iter_windows``, ``position_after``,
``stream_work``, ``pass_order``, ``state_plans``/``plan_to_json``): only the shard bytes are replaced by
sample ids, and a stream "consumes" a number of items instead of decoding them."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import numpy as np
import pytest

from data_pipeline.assignment import (
    carry_plans,
    decode_indices,
    encode_indices,
    iter_windows,
    pass_order,
    plan_to_json,
    position_after,
    resample_index,
    state_plans,
    stream_key,
    stream_work,
)

SEED, BUFFER = 11, 80  # windows of ~3 shards of 10–50 samples


class Pass:
    """One epoch of a synthetic dataset: shard s holds samples ``offset[s] … offset[s] + size[s] - 1``."""

    def __init__(self, n_shards: int, epoch: int = 0, seed: int = 5, empty: float = 0.01) -> None:
        rng = np.random.default_rng(seed)
        self.sizes = rng.integers(10, 51, size=n_shards)
        self.sizes[rng.random(n_shards) < empty] = 0  # a few shards give nothing (as rejected ones do)
        self.offset = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.n, self.epoch = n_shards, epoch
        self.order = pass_order(list(range(n_shards)), SEED, epoch)  # pass-order index → shard id
        self.total = int(self.sizes.sum())

    def read(self, i: int, count_bad: bool) -> list[int]:
        s = self.order[i]
        return list(range(int(self.offset[s]), int(self.offset[s] + self.sizes[s])))


def _state(p: Pass, rank: int, world: int, workers: int, positions: dict[int, dict], generation: int,
           plans: dict[int, Any] | None) -> dict[str, Any]:
    """A loader state (the fields ``PretrainLoader.state_dict`` writes that the assignment reads)."""
    state = {"version": 2, "epoch": p.epoch, "seed": SEED, "rank": rank, "world_size": world,
             "num_workers": workers, "resampled": False, "num_shards": p.n, "generation": generation,
             "positions": {str(w): pos for w, pos in positions.items()},
             "plans": None if plans is None else {
                 "epoch": p.epoch, "streams": {str(w): plan_to_json(pl) for w, pl in plans.items()}}}
    return json.loads(json.dumps(state))  # as a checkpoint stores it


def consume(p: Pass, state: dict[str, Any], plans: dict[int, Any] | None, worker: int, k: int | None,
            out: list[int]) -> dict[str, Any]:
    """Stream ``worker`` of ``state``'s rank (``plans``: its ``state_plans``) delivers ``k`` more items
    (None: all) into ``out``, as the loader's WorkerStream does; returns its position afterwards."""
    start = state["positions"].get(str(worker), {"pos": 0, "item": 0, "done": False})
    if start.get("done") or k == 0:
        return start
    plan, key = stream_work(None if plans is None else plans[worker], state["rank"], state["world_size"],
                            worker, state["num_workers"], p.n, state["generation"])
    fresh = plan.fresh
    pos = start["pos"]
    for win in iter_windows(plan.windows, lambda i: int(fresh[i]) if i < len(fresh) else None, p.read,
                            start["pos"], start["item"], BUFFER, SEED, p.epoch, key):
        left = len(win.order) - win.skip
        if k is not None and k <= left:
            out.extend(win.items[j] for j in win.order[win.skip:win.skip + k])
            return position_after(win, win.skip + k - 1)
        out.extend(win.items[j] for j in win.order[win.skip:])
        if k is not None:
            k -= left
        pos = win.end
    return {"pos": pos, "item": 0, "done": True}


def _random_take(rng: random.Random) -> int | None:
    """How much of its remaining work a stream reads before the switch: nothing, all, or 0–600 items."""
    u = rng.random()
    return 0 if u < 0.1 else None if u < 0.2 else rng.randrange(1, 600)


def run_world(p: Pass, states: list[dict], rng: random.Random | None, out: list[int]) -> list[dict]:
    """Every stream of the world reads a random part (rng) or all (None) of its work; the new states."""
    new = []
    for state in states:
        positions = {int(w): dict(v) for w, v in state["positions"].items()}
        plans = state_plans(state, p.epoch)
        for w in range(state["num_workers"]):
            positions[w] = consume(p, state, plans, w, None if rng is None else _random_take(rng), out)
        new.append(_state(p, state["rank"], state["world_size"], state["num_workers"], positions,
                          state["generation"], plans))
    return new


def reshape(p: Pass, states: list[dict], world: int, workers: int) -> list[dict]:
    """The new world's states right after ``PretrainLoader.load_states_from`` (plans, no positions)."""
    carry = carry_plans(states, world, workers)
    assert carry.epoch == p.epoch and carry.plans is not None
    return [_state(p, r, world, workers, {}, carry.generation,
                   {w: carry.plans[(r, w)] for w in range(workers)}) for r in range(world)]


def fresh_world(p: Pass, world: int, workers: int) -> list[dict]:
    return [_state(p, r, world, workers, {}, 0, None) for r in range(world)]


def test_64x8_to_48_to_72_delivers_every_sample_once() -> None:
    p = Pass(10_000)
    rng = random.Random(0)
    out: list[int] = []
    states = run_world(p, fresh_world(p, 64, 8), rng, out)
    first = len(out)
    assert 0.1 * p.total < first < 0.9 * p.total  # the switch is mid-pass
    windows_open = sum(1 for s in states for pos in s["positions"].values() if pos["item"] > 0)
    assert windows_open > 200  # most streams stop inside a window: the exact carry is exercised

    mid = reshape(p, states, 48, 8)
    carry = carry_plans(states, 48, 8)
    assert carry.carried_windows == windows_open and carry.generation == 1
    for r in (0, 17, 47):  # a rank computing only its own plans gets the same ones
        mine = carry_plans(states, 48, 8, ranks=[r]).plans
        assert mine is not None and set(mine) == {(r, w) for w in range(8)}
        for w in range(8):
            assert mine[(r, w)].windows == carry.plans[(r, w)].windows
            assert np.array_equal(mine[(r, w)].fresh, carry.plans[(r, w)].fresh)
    sizes = [len(pl.fresh) for pl in carry.plans.values()]
    assert max(sizes) - min(sizes) <= 1  # unstarted shards spread evenly
    states = run_world(p, mid, rng, out)
    assert len(out) < p.total

    last = reshape(p, states, 72, 8)
    assert last[0]["generation"] == 2
    run_world(p, last, None, out)
    counts = Counter(out)
    assert len(out) == p.total and len(counts) == p.total  # every sample of the pass, exactly once
    assert min(counts) == 0 and max(counts) == p.total - 1


def test_loader_workers_8_to_4_same_world() -> None:
    p = Pass(2_000, epoch=3)
    rng = random.Random(1)
    out: list[int] = []
    states = run_world(p, fresh_world(p, 8, 8), rng, out)
    run_world(p, reshape(p, states, 8, 4), None, out)
    assert sorted(out) == list(range(p.total))


def test_reshape_before_anything_is_read_is_the_new_worlds_own_pass() -> None:
    p = Pass(500)
    carry = carry_plans(fresh_world(p, 4, 2), 3, 2)
    assert carry.plans is None and carry.unstarted_shards == 500  # no plan: the new world's epoch_shards
    out: list[int] = []
    run_world(p, fresh_world(p, 3, 2), None, out)
    assert sorted(out) == list(range(p.total))


def test_everything_read_leaves_empty_plans() -> None:
    p = Pass(300)
    out: list[int] = []
    states = run_world(p, fresh_world(p, 2, 2), None, out)
    carry = carry_plans(states, 3, 1)
    assert carry.plans is not None and carry.carried_windows == carry.unstarted_shards == 0
    assert all(not pl.windows and len(pl.fresh) == 0 for pl in carry.plans.values())


def test_a_rank_an_epoch_ahead_sets_the_epoch() -> None:
    """Rank 1 finished epoch 0 and read part of epoch 1; rank 0 is still in epoch 0: the run is in epoch 1
    (the training worker ends epoch 0 on every rank), so epoch 1 is carried, each of its samples once."""
    p0, p1 = Pass(400, epoch=0), Pass(400, epoch=1)
    rng = random.Random(2)
    behind = run_world(p0, fresh_world(p0, 2, 2), rng, [])[0]  # rank 0, part of epoch 0
    out: list[int] = []
    ahead = run_world(p1, [fresh_world(p1, 2, 2)[1]], rng, out)[0]  # rank 1, part of epoch 1
    assert 0 < len(out) < p1.total
    carry = carry_plans([behind, ahead], 3, 2)
    assert carry.epoch == 1 and carry.lagging_ranks == [0]
    run_world(p1, reshape(p1, [behind, ahead], 3, 2), None, out)
    assert sorted(out) == list(range(p1.total))


def test_states_of_two_runs_are_refused() -> None:
    p = Pass(300)
    a = run_world(p, fresh_world(p, 2, 2), random.Random(3), [])
    b = reshape(p, a, 3, 2)
    mixed = [b[0], b[1], a[1]]
    for i, s in enumerate(mixed):
        s["rank"], s["world_size"], s["num_workers"] = i, 3, 2
    with pytest.raises(ValueError, match="belongs to two old streams"):
        carry_plans(mixed, 2, 2)


def test_resampled_reseeding_is_deterministic_and_new() -> None:
    n = 10_000
    for rank, worker in ((0, 0), (5, 3)):
        old = [resample_index(SEED, stream_key(rank, worker, 0), i, n) for i in range(64)]
        new = [resample_index(SEED, stream_key(rank, worker, 1), i, n) for i in range(64)]
        again = [resample_index(SEED, stream_key(rank, worker, 1), i, n) for i in range(64)]
        assert new == again and new != old
        assert len(set(new[:8]) & set(old)) <= 1  # does not replay the old stream's start
    assert stream_key(3, 1) == "3/1"  # generation 0: the seeds of loaders that never reshaped


def test_index_encoding_round_trips() -> None:
    for values in ([], [7], list(range(5, 10_000, 384)), [9, 2, 2**40, 0]):
        enc = json.loads(json.dumps(encode_indices(values)))
        assert decode_indices(enc).tolist() == values
    with pytest.raises(ValueError, match="count says"):
        decode_indices({**encode_indices([1, 2]), "count": 3})
