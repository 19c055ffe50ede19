"""A rank's side of a generation's barrier (flashrun/worker/group.py: await_peers): what each relayed outcome does.

The agent's relay is stood in for by a link that answers with a fixed outcome; the agent's side is tested against a
real store in tests/integration/test_store_rendezvous.py.
"""

from __future__ import annotations

import pytest

from flashrun.agent.node_barrier import COMPLETE, ERROR, SUPERSEDED, TIMEOUT
from flashrun.worker.abort import Aborter
from flashrun.worker.group import RELEASE_SLACK_S, Superseded, await_peers


class AnsweringLink:
    def __init__(self, answer: tuple[str, str] | None) -> None:
        self.answer = answer
        self.asked: list[tuple[int, float]] = []

    def await_release(self, generation: int, timeout_s: float) -> tuple[str, str] | None:
        self.asked.append((generation, timeout_s))
        return self.answer


def test_a_complete_barrier_lets_the_rank_form_the_group() -> None:
    link = AnsweringLink((COMPLETE, ""))
    await_peers(link, 3, Aborter(3), deadline_s=10.0)
    assert link.asked == [(3, 10.0 + RELEASE_SLACK_S)]  # the agent's own timeout comes first


def test_the_agents_timeout_says_how_many_nodes_came() -> None:
    with pytest.raises(TimeoutError, match="only 1 of 2 nodes"):
        await_peers(AnsweringLink((TIMEOUT, "only 1 of 2 nodes reached generation 3 within 10.0 s")), 3, Aborter(3),
                    deadline_s=10.0)


def test_no_answer_from_the_agent_is_a_timeout() -> None:
    with pytest.raises(TimeoutError, match="the agent did not release generation 3 within 10 s"):
        await_peers(AnsweringLink(None), 3, Aborter(3), deadline_s=10.0)


def test_a_store_failure_is_an_error_the_recovery_loop_can_wait_out() -> None:
    with pytest.raises(RuntimeError, match="store gone"):
        await_peers(AnsweringLink((ERROR, "store gone")), 3, Aborter(3), deadline_s=10.0)


def test_superseded_waits_for_the_newer_generations_command() -> None:
    aborter = Aborter(3)

    class CommandFollows(AnsweringLink):
        def await_release(self, generation: int, timeout_s: float) -> tuple[str, str] | None:
            answer = super().await_release(generation, timeout_s)
            aborter.command(4)  # on the link, the command comes right after the release
            return answer

    with pytest.raises(Superseded):
        await_peers(CommandFollows((SUPERSEDED, "")), 3, aborter, deadline_s=30.0)
    assert aborter.target == 4


def test_superseded_without_a_newer_command_meets_the_deadline() -> None:
    with pytest.raises(TimeoutError, match="no newer generation reached this rank"):
        await_peers(AnsweringLink((SUPERSEDED, "")), 3, Aborter(3), deadline_s=0.05)


def test_a_rank_already_commanded_past_the_generation_does_not_ask() -> None:
    aborter = Aborter(3)
    aborter.command(4)
    link = AnsweringLink((COMPLETE, ""))
    with pytest.raises(Superseded):
        await_peers(link, 3, aborter, deadline_s=10.0)
    assert link.asked == []
