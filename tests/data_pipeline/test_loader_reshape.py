"""The real loader carried across a change of world size and of DataLoader workers (load_states_from):
synthetic shards, epoch mode; every sample of the interrupted pass exactly once."""

from __future__ import annotations

import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.assignment import pass_order, stream_sequence
from data_pipeline.loader import LoaderConfig, PretrainLoader, epoch_shards


def _cfg(synth_dir: Path, **kw) -> LoaderConfig:
    base = dict(urls=str(synth_dir / "pretrain" / "manifest.json"), batch_size=5, max_image_side=48,
                pad_multiple=32, shuffle_buffer=20, seed=7, epochs=1)  # windows of 2 shards (12 pairs each)
    base.update(kw)
    return LoaderConfig(**base)


def _pass_keys(synth_dir: Path) -> Counter[str]:
    keys: Counter[str] = Counter()
    for p in sorted((synth_dir / "pretrain").glob("*.tar")):
        with tarfile.open(p) as tar:
            keys.update(json.loads(tar.extractfile(m).read())["key"]
                        for m in tar.getmembers() if m.name.endswith(".json"))
    return keys


def _read(loader: PretrainLoader, n: int | None) -> list[str]:
    """Keys of the next ``n`` batches (all remaining if None); the loader's state is then saved after them."""
    keys: list[str] = []
    for i, b in enumerate(loader):
        keys += b["keys"]
        if n is not None and i + 1 == n:
            break
    return keys


def _world(synth_dir: Path, world: int, workers: int, **kw) -> list[PretrainLoader]:
    return [PretrainLoader(_cfg(synth_dir, num_workers=workers, **kw), rank=r, world_size=world)
            for r in range(world)]


def _states(loaders: list[PretrainLoader]) -> list[dict]:
    return [json.loads(json.dumps(ld.state_dict())) for ld in loaders]  # as a checkpoint stores them


def test_reshape_2x2_to_3x2_to_1_delivers_the_pass_exactly_once(synth_dir: Path) -> None:
    expected = _pass_keys(synth_dir)
    assert sum(expected.values()) == 96
    seen: Counter[str] = Counter()
    old = _world(synth_dir, 2, 2)
    for ld, n in zip(old, (3, 2), strict=True):  # 15 and 10 samples: every stream inside a window
        seen.update(_read(ld, n))
    states = _states(old)
    assert all(p["item"] > 0 and "end" in p for s in states for p in s["positions"].values())

    mid = _world(synth_dir, 3, 2)
    for ld in mid:
        ld.load_states_from(states)
        assert ld.epoch == 0 and ld.generation == 1
    for ld, n in zip(mid, (2, 1, 3), strict=True):
        seen.update(_read(ld, n))
    mid_states = _states(mid)
    assert all(s["plans"]["epoch"] == 0 and s["generation"] == 1 for s in mid_states)

    last = PretrainLoader(_cfg(synth_dir, num_workers=0, epochs=2))
    last.load_states_from(mid_states)
    assert last.generation == 2
    rest, epoch1 = [], []
    for b in last:
        (rest if last.epoch == 0 else epoch1).extend(b["keys"])
    seen.update(rest)
    assert seen == expected  # every sample of the interrupted pass, each exactly once
    assert last.epoch == 2
    # The next epoch is the new world's own: the same keys in the same order as a never-reshaped loader's.
    fresh = PretrainLoader(_cfg(synth_dir, num_workers=0, epochs=2))
    state = fresh.state_dict()
    state.update(epoch=1)
    fresh.load_state_dict(state)
    assert _read(fresh, None) == epoch1


def test_reshape_2x2_to_1x2_and_resume_on_the_new_shape(synth_dir: Path) -> None:
    """2 → 1 rank; the new loader saved mid-plan resumes exactly (load_state_dict, same shape)."""
    expected = _pass_keys(synth_dir)
    seen: Counter[str] = Counter()
    old = _world(synth_dir, 2, 2)
    for ld, n in zip(old, (5, 1), strict=True):
        seen.update(_read(ld, n))
    states = _states(old)

    new = PretrainLoader(_cfg(synth_dir, num_workers=2), rank=0, world_size=1)
    new.load_states_from(states)
    seen.update(_read(new, 4))
    saved = _states([new])
    # Same shape: load_states_from is load_state_dict, and the plans travel in the state.
    again = PretrainLoader(_cfg(synth_dir, num_workers=2), rank=0, world_size=1)
    again.load_states_from(saved)
    assert again.state_dict() == saved[0]
    tail = _read(again, None)
    seen.update(tail)
    assert seen == expected
    # Reading on from the un-saved loader gives the same tail (the plan is deterministic).
    assert _read(new, None) == tail


def test_counters_are_shared_and_rejections_united(synth_dir: Path) -> None:
    old = _world(synth_dir, 2, 0)
    states = _states(old)
    states[0]["bad_counts"], states[1]["bad_counts"] = {"undecodable_image": 2}, {"undecodable_image": 3}
    states[0]["batches_yielded"], states[1]["batches_yielded"] = 7, 4
    states[0]["rejected_shards"] = {"a.tar": "shard_hash_mismatch (x)"}
    states[1]["rejected_shards"] = {"b.tar": "shard_size_mismatch (y)"}
    one = PretrainLoader(_cfg(synth_dir, num_workers=0))
    one.load_states_from(states)
    assert one.bad_sample_counts() == {"undecodable_image": 5} and one.batches_yielded == 11
    assert set(one.rejected_shards()) == {"a.tar", "b.tar"}
    three = _world(synth_dir, 3, 0)
    for ld in three:
        ld.load_states_from(states)
    assert [ld.batches_yielded for ld in three] == [7, 4, 0]
    shares = [ld.bad_sample_counts() for ld in three]
    assert shares == [{"undecodable_image": 2}, {"undecodable_image": 3}, {}]


def test_load_states_from_refuses_what_it_cannot_carry(synth_dir: Path) -> None:
    old = _world(synth_dir, 2, 0)
    for ld in old:
        _read(ld, 1)
    states = _states(old)
    new = PretrainLoader(_cfg(synth_dir, num_workers=0))
    with pytest.raises(ValueError, match=r"1 loader state\(s\) given, but they were saved by a world of 2"):
        new.load_states_from(states[:1])
    with pytest.raises(ValueError, match=r"states\[0\] was saved by rank 1"):
        new.load_states_from(states[::-1])
    with pytest.raises(ValueError, match="seed=7 but this loader has seed=8"):
        PretrainLoader(_cfg(synth_dir, num_workers=0, seed=8)).load_states_from(states)
    v1 = [dict(s, version=1, positions={k: {kk: vv for kk, vv in p.items() if kk != "end"}
                                        for k, p in s["positions"].items()}) for s in states]
    with pytest.raises(ValueError, match="extent was not saved; resume with the old world size"):
        new.load_states_from(v1)
    with pytest.raises(ValueError, match="another world size or worker count: use load_states_from"):
        new.load_state_dict(states[0])


def test_resampled_streams_are_reseeded(synth_dir: Path) -> None:
    old = _world(synth_dir, 2, 0, resampled=True, epochs=None)
    before = [_read(ld, 2) for ld in old]
    states = _states(old)
    runs = []
    for _ in range(2):
        new = _world(synth_dir, 3, 0, resampled=True, epochs=None)
        for ld in new:
            ld.load_states_from(states)
            assert ld.generation == 1 and ld.state_dict()["positions"] == {}
        runs.append([_read(ld, 2) for ld in new])
    assert runs[0] == runs[1]  # deterministic
    fresh = [_read(ld, 2) for ld in _world(synth_dir, 3, 0, resampled=True, epochs=None)]
    assert runs[0] != fresh  # not the never-reshaped world's streams: a new seed key
    assert all(keys not in before for keys in runs[0])


def test_unreshaped_split_is_the_one_saved_states_were_made_with() -> None:
    """epoch_shards (now built on assignment's pieces) splits exactly as before state version 2, so saved
    states resume onto the same shards."""
    shards = [f"s{i}" for i in range(103)]
    for rank, world, worker, workers in ((0, 4, 0, 3), (3, 4, 2, 3), (1, 2, 1, 1)):
        order = list(shards)
        random.Random("7/shards/2").shuffle(order)
        before = order[rank::world][worker::workers]
        assert epoch_shards(shards, 7, 2, rank, world, worker, workers) == before
        order = pass_order(shards, 7, 2)
        assert [order[i] for i in stream_sequence(rank, world, worker, workers, 103)] == before
