"""The time budget (fungpt/budget.py) on a fake clock: exact, and in milliseconds.

The budget tests in test_hardware.py train for real within 6 s budgets, with a tolerance for a busy machine: they
cannot see a term missing from the planning (one checkpoint's time, the exit's half second, a step of the lr
schedule). Here the training loop's use of a TimeBudget is replayed with made-up durations on a clock that only
moves when the test says, so the run's end and its lr schedule come out exact.
"""

from __future__ import annotations

import dataclasses

import pytest

from fungpt import budget
from fungpt.budget import EXIT_RESERVE_S, TORCHRUN_EXIT_S, TimeBudget, budget_spent, end_reserve
from fungpt.config import TrainConfig

EXIT_S = 0.5  # what the command's exit takes after the final checkpoint, in these replays


@pytest.fixture()
def clock(monkeypatch):
    """A fake time.time() for budget.py: a one-item list, moved by the test."""
    now = [1000.0]
    monkeypatch.setattr(budget.time, "time", lambda: now[0])
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    return now


@dataclasses.dataclass
class Durations:
    """Seconds each part of a replayed run takes."""

    setup: float = 2.0
    step: float = 0.1
    eval: float = 0.4
    save: float = 0.3
    plot: float = 0.2


def replay(now: list[float], tc: TrainConfig, d: Durations):
    """Run TimeBudget as train.py's loop does, with durations `d`: setup, the budget's planning at step 0 (an eval
    estimate, a checkpoint and the plot, timed), then steps with their periodic evals and checkpoints until
    out_of_time, then the end (final eval, two checkpoints, plot, exit). Returns the lr schedule's position at each
    step, the step the run ended at, the forecasts of its last step made as it went, whether a periodic eval came
    right after its last step, and the command's end on the clock, from its start."""
    start = now[0]
    tb = TimeBudget(tc, train_start=start, timings={})
    now[0] += d.setup
    tb.eval_times.append(d.eval)  # (evaluation.py: estimate_eval_time)
    now[0] += d.save
    tb.save_times.append(d.save)  # the step-0 checkpoint
    now[0] += d.plot
    tb.plot_s = d.plot
    tb.start_schedule(0.0)
    step, position, positions, forecasts, eval_last = 0, 0.0, [], [], False
    while step < tc.max_iters:
        if tb.out_of_time(step):
            break
        position = max(position, tb.schedule_position(step))  # (train.py: agree_on_next_step)
        positions.append(position)
        started = now[0]
        now[0] += d.step
        step += 1
        tb.step_done(d.step, started)
        forecasts.append(tb.last_step_forecast(step))
        eval_last = step % tc.eval_interval == 0 and step < tc.max_iters  # (at max_iters: the final eval instead)
        if eval_last:
            now[0] += d.eval
            tb.eval_times.append(d.eval)
        if step % tc.checkpoint_interval == 0 and step < tc.max_iters:
            now[0] += d.save
            tb.save_times.append(d.save)
    # train.py's end: the final eval unless the last step was just evaluated, and a checkpoint after it, or one
    # unless just saved; then the plot and the exit
    saved_last = step % tc.checkpoint_interval == 0 and step < tc.max_iters
    now[0] += (d.save * (not saved_last) if eval_last else d.eval + 2 * d.save) + d.plot + EXIT_S
    return positions, step, forecasts, eval_last, now[0] - start


def budget_config(**kw) -> TrainConfig:
    return TrainConfig(**{"max_iters": 1_000_000, "max_minutes": 0.5, "warmup_iters": 10, "eval_interval": 50,
                          "checkpoint_interval": 80, **kw})


def test_end_reserve_is_the_final_eval_two_checkpoints_the_plot_and_the_exit(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert end_reserve({"eval": 1.0, "save": 2.0, "plot": 3.0, "step": 9.0}) == 1.0 + 4.0 + 3.0 + EXIT_RESERVE_S
    assert end_reserve({}) == EXIT_RESERVE_S
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # under torchrun, whose own exit comes after the workers'
    assert end_reserve({}) == EXIT_RESERVE_S + TORCHRUN_EXIT_S


def test_the_budget_is_spent_when_two_more_steps_and_the_end_no_longer_fit():
    timings = {"step": 1.0, "eval": 2.0, "save": 0.5, "plot": 0.25}
    end = 2 * 1.0 + end_reserve(timings)  # 5.25 s and the exit's reserve
    assert not budget_spent(100.0 - end - 0.01, timings, 100.0)
    assert budget_spent(100.0 - end, timings, 100.0)


def test_a_resume_plans_with_its_checkpoints_eval_and_save_times_until_it_measures_its_own(clock):
    """Forgotten, a resumed run reserved nothing for its final eval and checkpoints until it did one of each."""
    tc = budget_config(max_minutes=1.0)
    tb = TimeBudget(tc, train_start=clock[0] - 30.0, timings={"step": 0.1, "eval": 7.0, "save": 5.0, "plot": 0.2})
    assert tb.timings() == {"step": 0.1, "eval": 7.0, "save": 5.0, "plot": 0.2}
    assert tb.end_time() == pytest.approx(7.0 + 2 * 5.0 + 0.2 + EXIT_RESERVE_S)
    clock[0] += 60.0 - 30.0 - 2 * 0.1 - tb.end_time() - 0.01  # just before the budget is spent ...
    assert not tb.out_of_time(0)
    clock[0] += 0.02  # ... and just after
    assert tb.out_of_time(0)


def test_before_a_step_is_timed_the_budget_plans_with_the_planning_forwards_guess(clock):
    """A step was counted as 0 s until the first one was timed: one 10 s step (a big model on a CPU) overran a 12 s
    budget by 6 s, where the planning's forward timing had already said it would take seconds."""
    tc = budget_config(max_minutes=0.2, batch_size=8, grad_accum_steps=4)
    tb = TimeBudget(tc, train_start=clock[0] - 5.0, timings={})
    assert tb.step_estimate() == 0.0  # (nothing timed, no planning: nothing known)
    tb.plan_first_step(0.1)  # 0.1 s per forward window
    assert tb.step_estimate() == pytest.approx(3 * 8 * 4 * 0.1)  # forward and backward (2 forwards) of 32 windows
    assert tb.out_of_time(0)  # 5 s used + 2 x 9.6 s > 12 s: no step is started
    tb.step_done(0.5, clock[0])  # a first step timed: it stands, as before, until a second one
    assert tb.step_estimate() == 0.5
    untimed = TimeBudget(budget_config(max_minutes=None), train_start=clock[0], timings={})
    untimed.plan_first_step(0.1)  # (no budget: nothing to plan)
    assert untimed.step_estimate() == 0.0


@pytest.mark.parametrize("estimate, other_evals, reserved", [
    (3.0, False, 7.0),  # the same evals: the checkpoint's measured time stands over a smaller estimate
    (8.4, False, 7.0),  # ... and over a larger one only by its margin (8.4 / 1.3 < 7: the same machine's speed)
    (9.8, False, 9.8),  # a slower machine, device or dtype (or a bigger val split): the larger estimate
    (3.0, True, 3.0),  # other evals (fewer batches): the estimate alone
    (70.0, True, 70.0),  # (100 times the eval_iters: was planned with 7 s, and ran past its budget)
])
def test_a_resumes_estimate_of_its_eval_replaces_the_checkpoints_when_larger_or_for_other_evals(
        clock, estimate, other_evals, reserved):
    tb = TimeBudget(budget_config(max_minutes=1.0), train_start=clock[0] - 30.0,
                    timings={"step": 0.1, "eval": 7.0, "save": 5.0, "plot": 0.2})
    tb.eval_estimated(estimate, other_evals, margin=1.3)
    assert tb.timings()["eval"] == reserved
    assert tb.end_time() == pytest.approx(reserved + 2 * 5.0 + 0.2 + EXIT_RESERVE_S)


@pytest.mark.parametrize("step_s", [0.05, 0.1, 0.13, 0.3])
@pytest.mark.parametrize("eval_interval", [7, 10, 13, 50])
def test_a_budget_run_ends_within_its_budget_having_used_it(clock, step_s, eval_interval):
    tc = budget_config(eval_interval=eval_interval)
    d = Durations(step=step_s, save=0.6)  # (a checkpoint slower than a step: one missing from the end would show)
    _, _, _, _, end = replay(clock, tc, d)
    assert end <= 30.0  # within the budget ...
    # ... and not much before its end: less than the two steps kept in hand and a periodic eval and checkpoint
    assert end >= 30.0 - 3 * step_s - d.eval - d.save


def test_a_budget_run_ends_on_time_with_its_lr_decayed_even_right_after_a_periodic_eval(clock):
    """The last step runs at the end of the schedule (min_lr), also when a periodic eval follows it: the check
    that the run stops after the step counts that eval's time."""
    ends_on_an_eval = 0
    for eval_s in (0.5, 1.5, 3.0):
        for eval_interval in range(5, 40):
            tc = budget_config(eval_interval=eval_interval, checkpoint_interval=1000)
            clock[0] = 1000.0
            positions, _, _, eval_last, end = replay(clock, tc, Durations(eval=eval_s))
            assert positions[-1] == tc.decay_iters, (eval_s, eval_interval)
            assert end <= 30.0
            ends_on_an_eval += eval_last
    assert ends_on_an_eval >= 3  # (the case this test is for came up)


@pytest.mark.parametrize("step_s", [0.05, 0.07, 0.1, 0.11, 0.17, 0.23])
def test_the_lr_schedule_reaches_its_end_with_the_last_step_not_in_a_jump(clock, step_s):
    """The schedule runs on the budget's time less the end and the two steps kept in hand, taken at the step's end:
    the decay moves on by at most one step's share at the last step, not 2-3 steps' at once."""
    tc = budget_config(eval_interval=100_000, checkpoint_interval=100_000)
    positions, _, _, _, _ = replay(clock, tc, Durations(step=step_s))
    share = positions[-2] - positions[-3]  # one step's share of the schedule (no eval between them)
    assert positions[-1] == tc.decay_iters
    assert positions[-1] - positions[-2] <= share * 1.001


def test_the_forecast_of_the_last_step_counts_the_evals_and_checkpoints_to_come(clock):
    """The progress bar's total: counted as steps, the periodic evals' time made it too high at first, and shrink
    at each eval (the bar's percentage went back and forth)."""
    tc = budget_config(eval_interval=20, checkpoint_interval=30)
    _, last, forecasts, _, _ = replay(clock, tc, Durations(step=0.1, eval=0.5, save=0.3))
    for step, forecast in enumerate(forecasts[5:], start=6):  # (from the sixth step: the median of five steps)
        assert abs(forecast - last) <= 0.03 * last, (step, forecast, last)


def test_a_budget_that_holds_max_iters_reaches_it(clock):
    """The eval and checkpoint due at max_iters are not periodic ones (the final ones take their place, already
    reserved): counted twice, a budget 3 s too short for them stopped the run a step before max_iters."""
    tc = budget_config(max_iters=50, eval_interval=50, checkpoint_interval=50, max_minutes=12.3 / 60)
    _, last, _, _, end = replay(clock, tc, Durations(step=0.1, eval=3.0, save=0.3))
    assert last == 50 and end <= 12.3


def test_the_forecast_is_max_iters_when_they_come_before_the_budget(clock):
    tc = budget_config(max_iters=40)
    positions, last, forecasts, _, _ = replay(clock, tc, Durations())
    assert last == 40 and forecasts[5:] == [40] * len(forecasts[5:])
    assert positions[-1] == pytest.approx(39 / 40 * tc.decay_iters)  # (steps, not time, lead the schedule)


def test_periodic_time_left_counts_the_evals_and_checkpoints_still_due():
    """The training bar adds it to its time left until its first periodic eval: the evals and checkpoints due after
    a step, before max_iters (the final ones come once the steps are done), at their timed durations."""
    tc = TrainConfig(max_iters=100, eval_interval=25, checkpoint_interval=50, device="cpu")
    tb = TimeBudget(tc, train_start=0.0, timings={"eval": 2.0, "save": 1.0})
    assert tb.periodic_time_left(0) == 3 * 2.0 + 1 * 1.0  # evals after steps 25, 50, 75; a checkpoint after 50
    assert tb.periodic_time_left(24) == 3 * 2.0 + 1.0
    assert tb.periodic_time_left(25) == 2 * 2.0 + 1.0  # (25's done)
    assert tb.periodic_time_left(50) == 2.0
    assert tb.periodic_time_left(99) == tb.periodic_time_left(100) == 0.0
    assert TimeBudget(tc, train_start=0.0, timings={}).periodic_time_left(0) == 0.0  # nothing timed yet


def test_a_resume_counts_the_periodic_eval_due_after_its_next_step():
    """The training loop stops before a step whose periodic eval would not fit (out_of_time); a resume's check did
    not count it, so a run was told it could resume, then found no time for that step."""
    from fungpt.train import already_done

    tc = TrainConfig(max_iters=100, eval_interval=10, checkpoint_interval=1000, max_minutes=1.0)
    timings = {"step": 0.1, "eval": 5.0, "save": 0.1, "plot": 0.0}
    assert already_done(8, tc, 50.0, timings) is None  # (no eval due after step 9)
    assert "already used its time budget" in already_done(9, tc, 50.0, timings)  # (step 10's eval would not fit)
    # a resume with other evals than the checkpoint timed estimates them again: the checkpoint's 5 s eval (one of
    # 100 eval_iters, say, where the resume asks 1) counted twice, it was refused after 1 s of a 13 s budget
    assert already_done(9, tc, 50.0, timings, periodic=False) is None
