"""Which shards each loader stream reads, and how a pass's data position survives a change of world size
or of DataLoader workers. Pure functions: no I/O, no torch (``loader.py`` does the reading).

Terms
-----
* *Pass order* of epoch ``e``: the shard list shuffled by ``(seed, e)`` (:func:`pass_order`). Everything
  below names a shard by its index in the pass order.
* *Stream*: one (rank, DataLoader worker) of a world of ``W`` ranks × ``n`` workers, ``S = W·n`` streams.
  Without a reshape, stream ``(r, w)`` reads the indices ``r + W·w + S·i``, ``i = 0, 1, …``
  (:func:`stream_sequence`; the loader's ``epoch_shards``).
* *Window*: a stream reads consecutive shards of its sequence until it holds ``≥ shuffle_buffer`` samples,
  then permutes them with a seed naming the stream and the window's first position (:func:`window_seed`,
  ``"{seed}/window/{epoch}/{stream key}/{pos}"``). :func:`iter_windows` is that reading, with the shard
  reader passed in.
* *Position* (what the loader saves per stream, after each delivered batch): ``{"pos", "item", "end",
  "done"}``: window ``pos`` (sequence positions ``pos … end-1``) has delivered the first ``item`` samples
  of its permuted order; everything before ``pos`` is delivered, nothing from ``end`` on has been read.
  ``item == 0``: window ``pos`` not started (``end`` absent). ``done``: the stream finished its pass.

Reshape (:func:`carry_plans`): the loaders of the new world (``W'`` ranks × ``n'`` workers) get every old
rank's state and compute, each the same way, a :class:`StreamPlan` per new stream for the rest of the
interrupted pass:

* every *partially read window* of an old stream becomes a carried :class:`Window`: the same shards, the
  same seed key, ``skip`` = the items already delivered. The new stream re-reads exactly those shards,
  re-creates the same permutation and delivers the items from ``skip`` on. (Windows carried from an
  earlier reshape and not yet finished are carried again, unchanged or with a larger ``skip``.)
* every shard *no old stream has started* (the tail of each old stream's sequence after its current
  window) goes, in pass order, round-robin to the new streams (stream id ``j = r' + W'·w'``), after the
  carried windows were dealt the same way (window ``c`` → stream ``c mod S'``, unstarted shard ``t`` →
  stream ``(C + t) mod S'``, ``C`` = number of carried windows): every new stream gets within one window
  and one shard of the others. With nothing started and nothing carried this is exactly the new world's
  own ``epoch_shards`` split, and no plan is made.
* A planned stream reads its carried windows first (one sequence position each), then its fresh shards
  in windows as usual, keyed ``g{generation}/{rank}/{worker}`` (the generation counts reshapes, so no
  seed of the new world repeats one of an old world). Plans hold only for the interrupted pass; later
  epochs use the new world's ``epoch_shards``.

Guarantee: if the shards read the same as before (same bytes, no shard unreadable on one read and readable on
the next — the condition an ordinary resume needs too), every sample of the interrupted pass that the old
world had not delivered is delivered exactly once by the new world, and none it had delivered is delivered
again — with no exception for windows (they are re-read, not dropped: the new world reads again at most one
window per old stream, as a resume re-reads the window it resumes into). The usual pass exceptions still hold:
``drop_last`` drops each stream's short last batch (the new streams' too), and samples that cannot be decoded
are counted, not delivered. Positions saved by ``STATE_VERSION`` 1 do not record a started window's ``end``; a
reshape from such a state refuses (unless that stream is between windows or done), naming the rank and worker:
resume on the old shape up to the next checkpoint (a stream saves a version-2 position with each batch it
delivers), then change the shape.

That is the loaders' guarantee. The training worker ends an epoch on every rank as soon as one rank runs
dry, which cuts the tail of a carried pass as it cuts any epoch's: the dealing keeps every rank within one
carried window and one shard (in count) of the others, so each rank loses at most about that much.

Epochs: a rank's loader can be one epoch ahead of another's (it ran out of its share first). The training
worker ends an epoch on every rank as soon as one rank delivers a batch of the next (the others skip the
rest of their share), so the run is in the *highest* saved epoch ``E``; a reshape continues ``E``, and a
rank saved at an earlier epoch counts as having read nothing of ``E`` (the rest of its earlier epoch is
left out, as a resume on the old shape would leave it out).

Cost: O(shards + old streams), numpy over the pass-order indices, the same for one new rank as for all
(``benchmarks/reshard_assignment.py``, 1M shards, 2 busy shared cores: 64×8 → 48×8 0.05–0.08 s; 48×8 → 72×8
from plans 0.14–0.25 s including decoding them; one rank's plans ~21 KB of JSON in its loader state).
"""

from __future__ import annotations

import base64
import random
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
Indices = Sequence[int]  # range, list or 1-D numpy integer array of pass-order indices


# ------------------------------------------------------------------------------ the pure stream pieces


def pass_order(items: Sequence[T], seed: int, epoch: int) -> list[T]:
    """``items`` (the shard list) shuffled for epoch ``epoch``: the pass order every rank agrees on."""
    order = list(items)
    random.Random(f"{seed}/shards/{epoch}").shuffle(order)
    return order


def stream_sequence(rank: int, world_size: int, worker: int, num_workers: int, n_shards: int) -> range:
    """Pass-order indices read by stream (rank, worker) of an un-reshaped pass
    (``order[rank::W][worker::n]``)."""
    return range(rank + world_size * worker, n_shards, world_size * num_workers)


def stream_key(rank: int, worker: int, generation: int = 0) -> str:
    """The name in a stream's seeds: ``"{rank}/{worker}"``, ``"g{generation}/{rank}/{worker}"`` after a
    reshape (generation 0 keeps the seeds of loaders that never reshaped)."""
    return f"{rank}/{worker}" if generation == 0 else f"g{generation}/{rank}/{worker}"


def window_seed(seed: int, epoch: int, key: str) -> str:
    """Seed of a window's permutation; ``key`` = ``"{stream key}/{pos}"``."""
    return f"{seed}/window/{epoch}/{key}"


def resample_index(seed: int, key: str, i: int, n_shards: int) -> int:
    """Resampled mode: the shard (index into the shard list) drawn at position ``i`` of stream ``key``."""
    return random.Random(f"{seed}/resample/{key}/{i}").randrange(n_shards)


@dataclass(frozen=True)
class Window:
    """A partially read window carried to another stream: re-read ``shards``, permute by ``key``'s seed,
    deliver from item ``skip`` on."""

    shards: tuple[int, ...]  # pass-order indices, in reading order
    key: str  # "{stream key}/{pos}" of the stream that started it
    skip: int  # items of its permuted order already delivered


@dataclass(frozen=True)
class StreamPlan:
    """One stream's work for a pass: carried windows (sequence positions 0…K-1), then fresh shards."""

    windows: tuple[Window, ...] = ()
    fresh: Indices = field(default_factory=tuple)


@dataclass
class WindowRead:
    """One window as a stream reads it."""

    pos: int  # its first sequence position
    end: int  # the next window's position
    items: list[Any]  # what ``read`` returned for its shards, in reading order
    order: list[int]  # the permutation: item ``order[k]`` is delivered k-th
    skip: int  # items of ``order`` already delivered before this reading


def stream_work(
    plan: StreamPlan | None, rank: int, world_size: int, worker: int, num_workers: int, n_shards: int,
    generation: int,
) -> tuple[StreamPlan, str]:
    """A stream's work for a pass and its seed key: its reshape ``plan`` (key of ``generation``), or (None)
    the usual :func:`stream_sequence` (key of generation 0, the seeds of a loader that never reshaped)."""
    if plan is not None:
        return plan, stream_key(rank, worker, generation)
    usual = StreamPlan((), stream_sequence(rank, world_size, worker, num_workers, n_shards))
    return usual, stream_key(rank, worker)


def iter_windows(
    windows: Sequence[Window], shard_at: Callable[[int], int | None],
    read: Callable[[int, bool], list[T]], pos: int, item: int, shuffle_buffer: int, seed: int, epoch: int,
    key: str,
) -> Iterator[WindowRead]:
    """A stream's windows from position (``pos``, ``item``) on.

    ``windows``: carried windows (positions ``0…K-1``); ``shard_at(i)``: the ``i``-th fresh shard (``None``
    past the end; position ``K + i``); ``read(shard, count_bad)``: its samples (``count_bad`` is False when
    the window was read before, from its start, by whoever delivered its first items). Ends when no
    shard is left.
    """
    k = len(windows)
    target = max(1, shuffle_buffer)
    while True:
        items: list[T] = []
        if pos < k:
            win = windows[pos]
            skip, end, wkey = max(item, win.skip), pos + 1, win.key
            for s in win.shards:
                items.extend(read(s, skip == 0))
        else:
            skip, end, wkey = item, pos, f"{key}/{pos}"
            while len(items) < target:
                s = shard_at(end - k)
                if s is None:
                    break
                end += 1
                items.extend(read(s, skip == 0))
            if end == pos:
                return
        order = list(range(len(items)))
        if shuffle_buffer > 1:
            random.Random(window_seed(seed, epoch, wkey)).shuffle(order)
        yield WindowRead(pos, end, items, order, skip)
        pos, item = end, 0


def position_after(win: WindowRead, idx: int) -> dict[str, Any]:
    """The stream's position once item ``order[idx]`` of ``win`` is delivered."""
    if idx + 1 >= len(win.order):
        return {"pos": win.end, "item": 0, "done": False}
    return {"pos": win.pos, "item": idx + 1, "end": win.end, "done": False}


# ---------------------------------------------------------------------------------- plans in a state


def encode_indices(values: Indices) -> dict[str, Any]:
    """A JSON-able, compact form of a list of indices (zlib'd int64 deltas, base64)."""
    arr = np.asarray(values, dtype=np.int64)
    deltas = np.diff(arr, prepend=np.int64(0)).astype("<i8")
    return {"count": int(arr.size), "zdeltas": base64.b64encode(zlib.compress(deltas.tobytes(), 6)).decode()}


def decode_indices(enc: Mapping[str, Any]) -> np.ndarray:
    try:
        raw = zlib.decompress(base64.b64decode(enc["zdeltas"]))
        arr = np.cumsum(np.frombuffer(raw, dtype="<i8")).astype(np.int64)
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        raise ValueError(f"loader state: a stream plan's fresh shard list does not decode: {e}") from e
    if arr.size != int(enc.get("count", -1)):
        raise ValueError(f"loader state: a stream plan lists {arr.size} fresh shards, its count says "
                         f"{enc.get('count')!r}")
    return arr


def plan_to_json(plan: StreamPlan) -> dict[str, Any]:
    return {"windows": [{"shards": list(w.shards), "key": w.key, "skip": w.skip} for w in plan.windows],
            "fresh": encode_indices(plan.fresh)}


def plan_from_json(d: Mapping[str, Any]) -> StreamPlan:
    try:
        windows = tuple(Window(tuple(int(s) for s in w["shards"]), str(w["key"]), int(w["skip"]))
                        for w in d["windows"])
        return StreamPlan(windows, decode_indices(d["fresh"]))
    except (KeyError, TypeError) as e:
        raise ValueError(f"loader state: malformed stream plan ({type(e).__name__}: {e})") from e


def state_plans(state: Mapping[str, Any], epoch: int) -> dict[int, StreamPlan] | None:
    """The per-worker plans a loader state holds for ``epoch`` (None: the epoch is not reshaped there)."""
    plans = state.get("plans")
    if not plans or int(plans.get("epoch", -1)) != epoch:
        return None
    return {int(w): plan_from_json(p) for w, p in plans["streams"].items()}


# ------------------------------------------------------------------------------------------ reshaping


@dataclass
class Carry:
    """What :func:`carry_plans` decided for the new world."""

    epoch: int  # the pass the plans are for
    generation: int  # reshapes so far, this one included
    plans: dict[tuple[int, int], StreamPlan] | None  # (rank, worker) → plan; None: the pass starts afresh
    carried_windows: int  # partially read windows handed over
    unstarted_shards: int  # shards no old stream had started
    lagging_ranks: list[int]  # old ranks saved at an earlier epoch (the rest of it is left out)


LAYOUT_KEYS = ("world_size", "num_workers", "seed", "resampled", "num_shards")


def check_old_states(states: Sequence[Mapping[str, Any]]) -> None:
    """``states`` must be every rank's loader state of one world, in rank order."""
    if not states:
        raise ValueError("load_states_from: no loader states given (expected one per old rank)")
    first = states[0]
    if int(first.get("world_size", -1)) != len(states):
        raise ValueError(f"load_states_from: {len(states)} loader state(s) given, but they were saved by a "
                         f"world of {first.get('world_size')!r} ranks: pass every old rank's state")
    for i, s in enumerate(states):
        if s.get("rank") != i:
            raise ValueError(f"load_states_from: states[{i}] was saved by rank {s.get('rank')!r}; pass the "
                             "old ranks' states in rank order")
        for k in LAYOUT_KEYS:
            if s.get(k) != first.get(k):
                raise ValueError(f"load_states_from: states[{i}] has {k}={s.get(k)!r} but states[0] has "
                                 f"{first.get(k)!r}: not the states of one run")
        if int(s.get("version", 1)) > 2:
            raise ValueError(f"load_states_from: states[{i}] has version {s.get('version')!r}, newer than "
                             "this loader understands (2)")


def carry_plans(
    states: Sequence[Mapping[str, Any]], new_world: int, new_workers: int,
    ranks: Sequence[int] | None = None,
) -> Carry:
    """The new world's plans for the rest of the interrupted pass (see the module docstring).

    ``states``: every old rank's loader state (``PretrainLoader.state_dict()``), in rank order, epoch mode.
    ``ranks``: the new ranks to make plans for (default: all). Deterministic in its inputs.
    """
    check_old_states(states)
    if new_world < 1 or new_workers < 1:
        raise ValueError(f"carry_plans: new world {new_world} × {new_workers} workers")
    if states[0].get("resampled"):
        raise ValueError("carry_plans: resampled streams have no pass to carry (they are reseeded)")
    old_world, old_workers = len(states), int(states[0]["num_workers"])
    n = int(states[0]["num_shards"])
    epoch = max(int(s["epoch"]) for s in states)
    generation = max(int(s.get("generation", 0)) for s in states) + 1
    lagging = [r for r, s in enumerate(states) if int(s["epoch"]) < epoch]

    carried: list[Window] = []
    owner = np.zeros(n, dtype=np.int8)  # how many old streams claim each shard (must stay ≤ 1)
    unstarted = np.zeros(n, dtype=bool)
    claims = 0  # shard claims counted one by one (a list claiming a shard twice shows here, not in owner)
    started_any = False
    for r, state in enumerate(states):
        at_epoch = int(state["epoch"]) == epoch
        plans = state_plans(state, epoch) if at_epoch else None
        positions = state.get("positions", {}) if at_epoch else {}
        for w in range(old_workers):
            if plans is not None and w not in plans:
                raise ValueError(f"loader state of rank {r}: reshaped epoch {epoch} has no plan for "
                                 f"worker {w}")
            plan, key = stream_work(None if plans is None else plans[w], r, old_world, w, old_workers, n,
                                    int(state.get("generation", 0)))
            started_any = started_any or plans is not None
            for win in plan.windows:
                owner[list(win.shards)] += 1
                claims += len(win.shards)
            fresh = plan.fresh
            claims += len(fresh)
            if isinstance(fresh, range):
                owner[fresh.start:fresh.stop:fresh.step] += 1
            else:
                owner[np.asarray(fresh, dtype=np.int64)] += 1
            position = positions.get(str(w), positions.get(w)) or {"pos": 0, "item": 0, "done": False}
            if position.get("done"):
                started_any = True
                continue
            pos, item, k = int(position["pos"]), int(position["item"]), len(plan.windows)
            started_any = started_any or pos > 0 or item > 0
            if pos < k:
                win = plan.windows[pos]
                carried.append(Window(win.shards, win.key, max(item, win.skip)) if item > 0 else win)
                carried.extend(plan.windows[pos + 1:])
                tail = 0
            elif item > 0:
                if "end" not in position:
                    raise ValueError(
                        f"loader state of rank {r} (version {state.get('version', 1)}): worker {w} is inside "
                        f"a window (pos {pos}, item {item}) whose extent was not saved; resume with the old "
                        "world size and workers up to the next checkpoint (it saves version-2 positions), "
                        "then change them")
                end = int(position["end"])
                shards = tuple(int(s) for s in fresh[pos - k:end - k])
                carried.append(Window(shards, f"{key}/{pos}", item))
                tail = end - k
            else:
                tail = pos - k
            if isinstance(fresh, range):
                sub = fresh[tail:]
                unstarted[sub.start:sub.stop:sub.step] = True
            else:
                unstarted[np.asarray(fresh[tail:], dtype=np.int64)] = True
    if owner.max(initial=0) > 1 or int(owner.sum(dtype=np.int64)) != claims:
        dup = np.flatnonzero(owner > 1)
        which = f"pass-order shard {int(dup[0])} belongs to two old streams" if dup.size else \
            "an old stream's plan names a shard twice"
        raise ValueError(f"load_states_from: {which}: the states are not one pass of one run")
    free = np.flatnonzero(unstarted)
    n_new = new_world * new_workers
    plans_out: dict[tuple[int, int], StreamPlan] | None = None
    if started_any or carried:
        plans_out = {}
        c = len(carried)
        for r2 in (range(new_world) if ranks is None else ranks):
            for w2 in range(new_workers):
                j = r2 + new_world * w2
                plans_out[(r2, w2)] = StreamPlan(tuple(carried[j::n_new]), free[(j - c) % n_new::n_new])
    return Carry(epoch, generation, plans_out, len(carried), int(free.size), lagging)
