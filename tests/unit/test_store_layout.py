"""Unit tests for how a job's nodes are split over store shards (flashrun/agent/store_barrier.py), pure."""

from __future__ import annotations

from flashrun.agent.store_barrier import barrier_key, leads_shard, shard_count, shard_key, shard_of


def test_a_job_no_larger_than_a_shard_is_one_shard_on_the_job_store() -> None:
    assert [shard_count(n, 256) for n in (1, 255, 256)] == [1, 1, 1]
    assert shard_of(200, 256, 256) == (0, 256)
    assert shard_count(100_000, 0) == 1  # 0: never shard
    assert not leads_shard(0, 256, 256)
    assert shard_key(3, "released", 0, 1) == barrier_key(3, "released") == "flashrun/g3/released"


def test_shards_are_runs_of_consecutive_node_ranks_the_last_one_shorter() -> None:
    assert shard_count(4096, 256) == 16
    assert shard_count(1000, 256) == 4
    assert [shard_of(node, 1000, 256) for node in (0, 255, 256, 767, 768, 999)] \
        == [(0, 256), (0, 256), (1, 256), (2, 256), (3, 232), (3, 232)]


def test_each_shard_is_led_by_its_first_node_and_keyed_apart() -> None:
    assert [node for node in range(1000) if leads_shard(node, 1000, 256)] == [0, 256, 512, 768]
    assert shard_key(3, "arrived", 2, 4) == "flashrun/g3/s2/arrived"
