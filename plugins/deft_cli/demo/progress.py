"""Where the whole demo stands: one line on stderr after each of its six phases (PEFT training, evaluation,
frontier, then DEFT's), with the time so far and an estimate of the time left.

Each phase has its own progress bar; this line adds up across them. A phase's time is estimated from the same
phase of an earlier run when there is one (DEFT's phases from PEFT's), else from the time per unit of work
measured so far, with the work of a phase counted in forward passes of one text (`OverallProgress.of_demo`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from ..frontier import SPARSITY_GRID

PHASES = ("training", "evaluation", "frontier")
# A training text (forward, backward and optimizer step) costs about 2.5 forward passes of a held-out text: the
# README's 2-core run trained 300 steps of 16 texts in 366 s and scored 1,000 held-out texts in 30 s.
TRAIN_TEXT_COST = 2.5


@dataclass
class OverallProgress:
    units: dict[str, float]  # phase -> its work, in forward passes of one text
    runs: tuple[str, ...]  # "peft", "deft", in the order they run
    started: float = field(default_factory=time.time)  # when the demo started (time.time(), shared by processes)
    measured: dict[tuple[str, str], float] = field(default_factory=dict)  # (run, phase) -> seconds it took
    run_started: float | None = None  # when the current run's subprocess was started (its training phase counts
    # from there: the process start and the model loading are part of the time a run takes)

    @classmethod
    def of_demo(cls, settings, n_eval: int, runs: tuple[str, ...], grid=SPARSITY_GRID) -> OverallProgress:
        """The demo's phases: training (steps x batch size texts), evaluation (the held-out texts once) and
        the frontier (the calibration texts once, the held-out texts at every non-zero grid sparsity)."""
        units = {"training": TRAIN_TEXT_COST * settings.steps * settings.batch_size,
                 "evaluation": float(n_eval),
                 "frontier": float(settings.calibration_texts or 0) + sum(1 for s in grid if s > 0) * n_eval}
        return cls(units, tuple(runs))

    @property
    def phases(self) -> list[tuple[str, str]]:
        return [(run, phase) for run in self.runs for phase in PHASES]

    def plan(self) -> str:
        names = ", ".join(f"{run.upper()} {phase}" for run, phase in self.phases)
        return f"overall: {len(self.phases)} phases ({names}); a line like this after each says where the run stands"

    def estimate(self, run: str, phase: str) -> float:
        """Seconds the phase took, or will take."""
        if (run, phase) in self.measured:
            return self.measured[(run, phase)]
        same = [seconds for (_, p), seconds in self.measured.items() if p == phase]
        if same:
            return sum(same) / len(same)
        done_units = sum(self.units[p] for _, p in self.measured)
        return self.units[phase] * sum(self.measured.values()) / done_units if done_units else 0.0

    def line(self, run: str, phase: str) -> str:
        done = sum(1 for key in self.phases if key in self.measured)
        left = sum(self.estimate(*key) for key in self.phases if key not in self.measured)
        elapsed = time.time() - self.started
        where = f"about {duration(left)} left" if done < len(self.phases) else "all done"
        return (f"overall: {done} of {len(self.phases)} phases done ({run.upper()} {phase} took "
                f"{duration(self.measured[(run, phase)])}); {duration(elapsed)} elapsed, {where}")

    def finished(self, run: str, phase: str, seconds: float) -> str:
        """Record a finished phase and print the overall line (stderr, with the progress bars)."""
        self.measured[(run, phase)] = seconds
        text = self.line(run, phase)
        print(text, file=sys.stderr, flush=True)
        return text

    def start_run(self) -> None:
        self.run_started = time.time()

    def training_seconds(self, train_seconds: float) -> float:
        """The training phase's time: since the run's subprocess started (when known), else the training loop's."""
        return time.time() - self.run_started if self.run_started is not None else train_seconds

    def measured_run(self, run: str, result: dict) -> None:
        """A run's phase times, after its subprocess ended: evaluation and frontier from its part of results.json,
        training the rest of the run's time (process start and model loading included)."""
        wall = time.time() - self.run_started if self.run_started is not None else None
        self.measured[(run, "evaluation")] = result["eval_seconds"]
        self.measured[(run, "frontier")] = result["frontier_seconds"]
        self.measured[(run, "training")] = (result["train_seconds"] if wall is None else
                                            max(result["train_seconds"],
                                                wall - result["eval_seconds"] - result["frontier_seconds"]))


def duration(seconds: float) -> str:
    """'45 s', '3 min 5 s', '1 h 2 min'."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
