"""The run's clock, and the time budget: a run given `train.max_minutes` = M ends within M minutes, its lr schedule
finished on time.

    elapsed     seconds since the run began (across resumes: the seconds before are carried in the checkpoint)
    durations   the last few steps', evals' and checkpoint saves' times, measured as the run goes
    end_time    what the end of the run will take (final eval, checkpoints, plot, exit), from those durations
    budget      another step is taken only while it, the periodic eval or checkpoint due after it, one more step and
                end_time still fit (out_of_time)
    schedule    the lr schedule runs on the fraction of the budget used, so warmup and decay finish on time

Without a budget the clock still keeps time (each checkpoint saves it, so that a resume given a budget can plan), and
the lr schedule runs on steps. The budget covers the whole command: start-up (imports, data, the model) and evals
count, so the first step's schedule position is taken from an `origin`, the seconds spent before it.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Collection

from fungpt.config import TrainConfig

# The seconds kept for the command to end after the final checkpoint: printing, closing files and exiting. The
# `fungpt` command exits with os._exit (cli.entry), 0.1 s after the final eval; a normal interpreter exit, tearing
# down torch, took 0.9-1.1 s and needed a 2.0 s reserve.
EXIT_RESERVE_S = 0.5
# Under torchrun the command ends when torchrun does: after its workers exit it notices, and closes its
# rendezvous; measured 0.4-0.8 s (2 CPU workers, --standalone).
TORCHRUN_EXIT_S = 1.0


def end_reserve(timings: dict[str, float]) -> float:
    """Seconds the end of a run takes, by its measured `timings`: final eval, two checkpoints (the final eval
    usually writes "best", then "latest"), loss plot (measured at step 0), and the command's exit."""
    exit_s = EXIT_RESERVE_S + (TORCHRUN_EXIT_S if os.environ.get("TORCHELASTIC_RUN_ID") else 0.0)
    return timings.get("eval", 0.0) + 2 * timings.get("save", 0.0) + timings.get("plot", 0.0) + exit_s


def typical(durations: Collection[float]) -> float:
    """The median of recent durations (of an even count, the longer middle one; 0.0 of none). Not the last one: one
    stalled by the machine (another program, an fsync waiting for the disk) would count as the time of every one to
    come, and end a time-budget run early with its lr schedule unfinished. Of two, the longer is taken: the shorter
    may be the step-0 checkpoint (a third the size: no optimizer state yet), too short for the later ones, so a
    stall right after it counts in full. The cost of the median: a lasting slowdown counts only from its second
    occurrence, and can overrun a budget by that much."""
    return sorted(durations)[len(durations) // 2] if durations else 0.0


def continuous_origin(would_be_s: float, now_s: float, origin_s: float, schedule_end_s: float) -> float:
    """The time-budget schedule's new origin after a delay that is not schedule time (a first step that compiled).

    The schedule's fraction is (t - origin) / (schedule_end - origin), t in budget seconds. The new origin gives
    at `now_s` the fraction that the old one gave at `would_be_s` (when the step would have ended without the
    delay), so the lr goes on from where it was, and the rest of the schedule fits in the time left. (Adding the
    delay to the origin would also stretch the fraction already used, by (end - origin) / (end - origin - delay).)
    """
    frac = (would_be_s - origin_s) / (schedule_end_s - origin_s) if schedule_end_s > origin_s else 1.0
    if not 0.0 <= frac < 1.0 or now_s >= schedule_end_s:
        # No schedule left to place: the run ends at its next check. (Solved for, the origin would lie past now, as
        # far as 1,000 s for a compile that crossed the end of a 40 s schedule.)
        return origin_s + max(0.0, now_s - would_be_s)
    # solving (now - o) / (end - o) = frac for o:
    return (now_s - frac * schedule_end_s) / (1.0 - frac)


def budget_spent(elapsed_s: float, timings: dict[str, float], budget_s: float) -> bool:
    """Whether a run that has used `elapsed_s` of its budget has no time left for two more steps and its end.

    Another step is taken only if two steps' time would still fit: step times vary by a few percent, and the
    budget is a promise to the user. A resume asks this of its checkpoint's timings alone, so that under DDP
    every rank comes to the same answer; the training loop asks it before each step.
    """
    return elapsed_s + 2 * timings.get("step", 0.0) + end_reserve(timings) >= budget_s


def periodic_due(tc: TrainConfig, step: int, eval_s: float, save_s: float) -> float:
    """The time of the periodic eval and checkpoint due after step `step` + 1, if any, by an eval's and a save's time
    (0.0 when none is due: at max_iters the final eval and checkpoint take their place, in end_reserve)."""
    if step + 1 >= tc.max_iters:
        return 0.0
    return ((step + 1) % tc.eval_interval == 0) * eval_s + ((step + 1) % tc.checkpoint_interval == 0) * save_s


def format_duration(seconds: float) -> str:
    """A duration as a person reads it: "42.3 s", "12 min 05 s", "2 h 07 min"."""
    if round(seconds, 1) < 60:  # (59.96 s would print as "60.0 s")
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


class TimeBudget:
    """One command's clock of a run: elapsed time, the measured durations, and (with `train.max_minutes`) when to
    stop and where the lr schedule stands.

    `timings` and the two origins come from the checkpoint a run resumes from (empty and None for a new run); the
    training loop adds each step's, eval's and save's duration as it goes (`step_done`, `eval_times`, `save_times`).
    """

    def __init__(self, tc: TrainConfig, train_start: float, timings: dict[str, float],
                 schedule_origin: float | None = None, lr_origin: float | None = None):
        self.tc = tc
        self.budget_s = tc.max_minutes * 60 if tc.max_minutes else None
        self.train_start = train_start  # the run's start, on time.time(), moved back by the seconds before a resume
        self.checkpoint_timings = timings  # the durations the checkpoint measured (0.0 there: none was measured)
        # How long the last three checkpoints and evals took: the budget reserves their typical time for its end
        # (few of them come in a run, and each takes a while: three is enough for a median)
        self.save_times = collections.deque([timings["save"]] if timings.get("save") else [], maxlen=3)
        self.eval_times = collections.deque([timings["eval"]] if timings.get("eval") else [], maxlen=3)
        # The last five steps' times but the command's first: their median follows a lasting slowdown within three
        # steps, and ignores two stalled ones
        self.step_times: collections.deque[float] = collections.deque(maxlen=5)
        self.first_step_s: float | None = None  # this command's first step, which also does one-time work
        self.plot_s = timings.get("plot", 0.0)
        # With torch.compile and a budget: a cap on the first step's measured time (mostly compiling) until a second
        # step is timed (see `plan_first_step`)
        self.compiled_first_guess = float("inf")
        self.first_guess = 0.0  # a step's time before one is timed (see `plan_first_step`)
        # The lr schedule's origins on the run's clock (set by start_schedule, saved in every checkpoint): the seconds
        # that are not schedule time (setup before step 1, each resume's start-up, compiles), and the origin the lr
        # follows (continuous_origin; None: checkpoints from before it was saved)
        self.schedule_origin, self.lr_origin = schedule_origin, lr_origin

    def eval_estimated(self, seconds: float, other_evals: bool, margin: float = 1.0) -> None:
        """A resume's estimate of one eval's time (evaluation.estimate_eval_time, which errs high by `margin`). The
        checkpoint's measured times stand unless the evals differ from those it timed (`other_evals`: then the
        estimate replaces them), or the estimate is larger even without its margin (another device, dtype or matmul
        library, a bigger val split): planned with the checkpoint's time, a resume with 100 times the eval_iters ran
        6 s past a 30 s budget."""
        if other_evals or not self.eval_times or seconds / margin > max(self.eval_times):
            self.eval_times.clear()
            self.eval_times.append(seconds)

    def elapsed(self) -> float:
        """Seconds since the run began, the commands before a resume included."""
        return time.time() - self.train_start

    def timings(self) -> dict[str, float]:
        """The measured durations a time budget plans with (also saved in each checkpoint)."""
        return {"step": self.step_estimate(), "eval": typical(self.eval_times), "save": typical(self.save_times),
                "plot": self.plot_s}

    def step_estimate(self) -> float:
        """How long the next step will take: the median of the last few steps (before two are timed: the
        slower of the checkpoint's value and the command's first step, or with torch.compile its guess; before any, the
        guess of `plan_first_step`).

        A median (see `typical`), not the last step's time: a step stalled by a page fault or the OS is not
        the speed of every step to come; a lasting slowdown still shows within three steps. The command's
        first step is left out: it also does one-time work (oneDNN builds its kernels, the memory allocator
        grows), and took 4x as long as the next ones in a test run.
        """
        if not self.step_times:  # (until a second step is timed, the first one's time, however slow, is all we know)
            # (before any: the planning's guess; counted as 0 s, one 10 s step overran a 12 s budget by 6 s)
            first = self.first_guess if self.first_step_s is None else min(self.first_step_s,
                                                                           self.compiled_first_guess)
            return max(self.checkpoint_timings.get("step", 0.0), first)
        return typical(self.step_times)

    def end_time(self) -> float:
        """Seconds the run's end will take (`end_reserve`)."""
        return end_reserve(self.timings())

    def periodic_time(self, step: int) -> float:
        """The time of the periodic eval and checkpoint due after step `step` + 1, if any (see periodic_due)."""
        return periodic_due(self.tc, step, typical(self.eval_times), typical(self.save_times))

    def periodic_time_left(self, step: int) -> float:
        """Seconds of the periodic evals and checkpoints still due after step `step` (before max_iters), as timed so
        far (a checkpoint not yet timed counts 0): what a time left reckoned from the steps' rate alone leaves out,
        as the training bar's does until the command's first periodic eval, whose time its rate then holds."""
        tc = self.tc
        last = tc.max_iters - 1  # (none at max_iters: the final eval and checkpoint come once the steps are done)
        evals = max(last // tc.eval_interval - step // tc.eval_interval, 0)
        saves = max(last // tc.checkpoint_interval - step // tc.checkpoint_interval, 0)
        return evals * typical(self.eval_times) + saves * typical(self.save_times)

    def out_of_time(self, step: int) -> bool:
        """Whether to stop before step `step` + 1, early enough that the final eval, checkpoint and plot also fit in
        the budget. The periodic eval or checkpoint due after that step counts too: left out, a checkpoint due after
        the last step (saved again after the final eval) overran the budget by its time less a step's."""
        return self.budget_s is not None and budget_spent(self.elapsed() + self.periodic_time(step), self.timings(),
                                                          self.budget_s)

    def schedule_position(self, step: int) -> float:
        """Where the run is in the lr schedule before step `step` + 1, in steps (with a budget: the budget's fraction
        used × decay_iters).

        With a budget, the fraction is taken at the expected end of this step (and of the periodic eval and
        checkpoint after it, when due), of the budget minus the time reserved for the final eval and
        checkpoint: the last step then runs at (almost) min_lr. The run ends at the budget or at max_iters,
        whichever comes first, so the schedule follows whichever of the two fractions (time, steps) is further
        along.
        """
        tc = self.tc
        if self.budget_s is None:
            return step
        step_s = self.step_estimate()
        # (the periodic eval and checkpoint that follow this step, if due, also take their time before the next check)
        periodic = self.periodic_time(step)
        if self.elapsed() + 3 * step_s + periodic + self.periodic_time(step + 1) + self.end_time() >= self.budget_s:
            # out_of_time will stop after this step (it needs this step's time, then two more steps' and the periodic
            # work due after the next one): finish the decay now
            return tc.decay_iters
        # (setup: data, model, the budget's planning (timed forwards, step-0 checkpoint and plot) is not schedule time)
        origin = self.lr_origin or 0.0
        # (less the two steps' time that out_of_time keeps in hand: the last step ends about there, so the decay
        # reaches its end with it, not 2-3 steps short and then at once)
        usable = max(self.budget_s - self.end_time() - origin - 2 * step_s, 1e-9)
        time_frac = min(1.0, max(0.0, self.elapsed() + step_s + periodic - origin) / usable)
        # (the steps' fraction at the start of the step, the time's at its end: with max_iters first, the run's lr is
        # step for step that of the same run without a budget, whose last step also runs 1/max_iters short of min_lr)
        return max(time_frac, step / tc.max_iters) * tc.decay_iters

    def last_step_forecast(self, step: int) -> int:
        """With a budget, the step the run should end at, for the progress bar (its percentage and time left): as
        many more steps as the budget left holds, or max_iters if it comes first. Each step counts with its share
        of the periodic evals and checkpoints to come (one eval per eval_interval steps): counted as steps, the
        total shrank at each eval, and the percentage went back and forth."""
        tc = self.tc
        left = self.budget_s - self.end_time() - self.elapsed()
        per_step = (self.step_estimate() + typical(self.eval_times) / tc.eval_interval
                    + typical(self.save_times) / tc.checkpoint_interval)
        return min(tc.max_iters, step + max(0, int(left / max(per_step, 1e-9))))

    def _continued(self, would_be: float, now: float, origin: float) -> float:
        """The origin that gives the schedule's position at `now` what `origin` gave at `would_be` (a delay that is
        not schedule time: a compile, a resumed command's start-up), as schedule_position reads it: a step ahead,
        of the budget less its end and the two steps kept in hand (continuous_origin)."""
        s = self.step_estimate()
        return continuous_origin(would_be + s, now + s, origin, self.budget_s - self.end_time() - 2 * s)

    def plan_first_step(self, per_window_s: float) -> None:
        """With a budget: guess a step's time from the planning's forward timing, before a step is timed.

        The guess: one forward window's time (`per_window_s`) times the step's windows, times 3 (a backward costs
        about two forwards). Until the first step is timed, the budget plans with it.
        With torch.compile the command's first step is mostly compiling: 17.4 s, against 24 ms for an uncompiled
        step (H200, configs/speedrun-gpu.toml). Taken as the step time, it ended a 60 s budget after one step.
        Until a second step is timed, such a run plans with the guess instead (the uncompiled model's speed, which
        compiling only makes faster).
        """
        if self.budget_s is not None:
            self.first_guess = 3 * self.tc.batch_size * self.tc.grad_accum_steps * per_window_s
            if self.tc.compile:
                self.compiled_first_guess = self.first_guess

    def start_schedule(self, elapsed_before: float) -> None:
        """Place the schedule's origins as the first step of this command begins (`elapsed_before`: the seconds the
        commands before a resume used)."""
        if self.schedule_origin is None:  # a new run, or one resumed from its step-0 checkpoint (saved before step 1)
            self.schedule_origin = self.lr_origin = self.elapsed()
        elif self.budget_s is not None:
            # A resumed command's start-up (imports, data, model, planning: seconds) is budget time but not schedule
            # time, as the first command's is not: counted in, the lr jumped on at the first step resumed (from 76%
            # of its peak to 36% in a WSD decay). It goes on from where the checkpoint left it instead (from the
            # origin the lr followed, saved with it; checkpoints from before that: the schedule's), the rest of the
            # schedule spread over the time left. (The schedule's origin moves by the start-up's time, as for a
            # compile.)
            lr_origin = self.lr_origin if self.lr_origin is not None else self.schedule_origin
            self.lr_origin = self._continued(elapsed_before, self.elapsed(), lr_origin)
            self.schedule_origin += self.elapsed() - elapsed_before
        else:
            self.lr_origin = self.schedule_origin

    def step_done(self, step_s: float, started: float) -> None:
        """Record a step's time (`started`: its start on time.time()). The command's first step is kept apart (it also
        does one-time work); with torch.compile and a budget, a first step that was mostly compiling moves the
        schedule's origins by the compile's time."""
        if self.first_step_s is not None:
            self.step_times.append(step_s)
            return
        self.first_step_s = step_s
        if self.first_step_s > self.compiled_first_guess:  # (only with torch.compile and a budget: see above)
            # Compiling is setup, not schedule time: counted in, it took 27 s of a 60 s budget on an H200 and the lr
            # had begun its decay by step 100 (a resume compiles again, so this holds for it too). The schedule's
            # origin moves by the compile's time. This command's lr goes on from where an uncompiled step would have
            # left it, the rest of the schedule spread over the time left: moved by the compile's time alone, its
            # origin also rescaled the schedule time before it (resumed half-way, the lr fell 12% of its peak in a
            # step).
            would_be = started - self.train_start + self.compiled_first_guess
            self.lr_origin = self._continued(would_be, self.elapsed(), self.lr_origin)
            self.schedule_origin += self.elapsed() - would_be
