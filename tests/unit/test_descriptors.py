"""Unit tests for flashrun.descriptors.plan: the coordinator's open-file limit for a job's size."""

from __future__ import annotations

import resource

from flashrun.descriptors import needed, plan


def test_a_soft_limit_that_suffices_is_left_alone() -> None:
    assert plan(8, soft=1024, hard=4096) == (None, "")
    assert plan(4096, soft=resource.RLIM_INFINITY, hard=resource.RLIM_INFINITY) == (None, "")


def test_the_soft_limit_is_raised_as_far_as_the_job_needs() -> None:
    assert needed(4096) == 16_736
    assert plan(4096, soft=1024, hard=1_048_576) == (16_736, "")
    assert plan(4096, soft=1024, hard=resource.RLIM_INFINITY) == (16_736, "")


def test_a_short_hard_limit_is_used_whole_and_said_in_one_line() -> None:
    new_soft, warning = plan(4096, soft=1024, hard=4096)

    assert new_soft == 4096
    assert "a job of 4096 nodes needs about 16736 open files" in warning
    assert "hard limit is 4096" in warning and "about 960 nodes" in warning
    assert "\n" not in warning


def test_nothing_to_raise_when_soft_already_equals_a_short_hard_limit() -> None:
    new_soft, warning = plan(4096, soft=4096, hard=4096)

    assert new_soft is None
    assert warning
