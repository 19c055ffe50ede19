"""The state-sync plan after a failure: the most advanced replica wins, everyone behind it takes its state."""

from flashrun.worker.replica import plan_sync


def test_a_replacement_takes_the_state_of_the_lowest_most_advanced_rank() -> None:
    plan = plan_sync([41, -1, 41, 41])

    assert (plan.best, plan.source, plan.behind) == (41, 0, (1,))


def test_ranks_that_missed_the_last_update_are_behind_too() -> None:
    # Ranks 2 and 3 applied step 42 before the failure; 0 and 1 were aborted before their update.
    plan = plan_sync([41, 41, 42, 42])

    assert (plan.best, plan.source, plan.behind) == (42, 2, (0, 1))


def test_nobody_is_behind_when_every_rank_agrees() -> None:
    assert plan_sync([7, 7]).behind == ()


def test_no_state_anywhere_has_best_minus_one() -> None:
    plan = plan_sync([-1, -1])

    assert plan.best == -1 and plan.behind == ()
