"""The decisions of a critical-step search for one (dataset, train method, gradient): which rung to train next.

A :class:`Ladder` knows the rungs of a search space (step counts, or tolerances, from
coarsest to finest), the verdicts of the rungs trained so far (solver-independent or
not, by :func:`tune_node.results.solver_independence`, the rule of
:mod:`tune_node.results.critical_step`) and nothing of Ray. It answers three
questions: which rungs are worth training now (:meth:`Ladder.wanted`, those the answer
needs first, then speculative ones), whether a rung in training can still change the
answer (:meth:`Ladder.useful`), and where the search stands (:meth:`Ladder.state`).

The search in two phases:

1. **Climb.** Let *d* be the finest trained rung found solver-dependent (none at the
   start). The candidate critical rung is the next finer one, *c*; it is confirmed when
   it and the ``confirm - 1`` rungs after it are trained and solver-independent. So the
   rungs from *c* to ``c + confirm - 1`` are needed, finer ones speculative (needed if one
   of those turns out dependent); coarser ones cannot move the answer, but one already in
   training finishes (it is cheap and shows whether the ladder is monotone). This is the rule of
   :func:`~tune_node.results.critical_steps` applied to the rungs trained: the coarsest
   setting from which every finer trained one is independent.
   Once the candidate has one independent rung, the refinement points of the bracket
   below it come first among the speculative rungs: they are needed if the candidate is
   confirmed, the likelier outcome, and cheaper than the rungs further up.
2. **Refinement.** With a bracket (*d* dependent, *c* independent) wider than
   ``refine`` (a ratio of step counts, or of tolerances), the setting halfway in
   log h (``round(sqrt(steps_d * steps_c))`` steps; ``sqrt(tol_d * tol_c)``) is trained
   and replaces the end of the bracket its verdict matches, until the ratio is at most
   ``refine`` or, for steps, no whole number lies between the ends. With several slots,
   each further point goes into the widest gap that the points in training leave; a
   point in training inside the bracket is never stopped (either verdict narrows it).

**The assumption**, and its risk: solver-independence is taken to be monotone in the
step size beyond the confirmed rungs and inside the bracket (a finer solver does not
make a model solver-dependent again). The paper's grids agree, but nothing guarantees
it: a model can be independent at one step count and dependent at a finer one
(seeds, learning-rate interplay). The climb never trains rungs beyond the confirmed
ones, so it cannot see such a rung where a full grid would; a larger ``confirm`` lowers
the risk at the price of more rungs. Where the rungs trained are not monotone (an
independent rung coarser than a dependent one), :meth:`Ladder.state` says so in
``non_monotone`` and the climb goes on above the dependent rung.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Ladder", "LadderState", "bisect"]


def bisect(coarse: float, fine: float, *, adaptive: bool) -> float | None:
    """The setting halfway between ``coarse`` and ``fine`` in log h, or None when there is none.

    Steps: the whole number nearest ``sqrt(coarse * fine)`` strictly between them (None for
    neighbours). Tolerances: ``sqrt(coarse * fine)`` rounded to 3 significant digits.
    """
    middle = math.sqrt(coarse * fine)
    if adaptive:
        return float(f"{middle:.3g}")
    low, high = sorted((int(coarse), int(fine)))
    if high - low < 2:
        return None
    return float(min(max(round(middle), low + 1), high - 1))


@dataclass
class LadderState:
    """Where one group's search stands.

    ``phase``: ``"climb"``, ``"refine"`` or ``"done"``. ``status`` (when done, else
    ``"running"``): ``"found"`` (a confirmed critical rung with a dependent one below),
    ``"coarsest"`` (the coarsest rung is confirmed: the true critical step may be
    coarser), ``"unconfirmed"`` (the ladder ended before ``confirm`` independent rungs),
    ``"none"`` (the finest rung is dependent) or ``"failed"`` (a rung's trial failed).
    ``dependent``/``critical``: the bracket's ends (None when absent); ``ratio``: their
    ratio; ``non_monotone``: the pairs of trained settings that break monotonicity,
    in words; ``why``: one line on what the search does next, or why it stopped.
    """

    phase: str
    status: str
    dependent: float | None
    critical: float | None
    ratio: float | None
    non_monotone: list[str] = field(default_factory=list)
    why: str = ""


class Ladder:
    """The search of one (dataset, train method, gradient) group.

    Arguments:
        rungs: the space's settings of the group, any order: step counts (fixed step)
            or tolerances (``adaptive``). At least two.
        adaptive: tolerances (larger is coarser) instead of step counts.
        confirm: consecutive independent rungs that confirm the critical one (>= 1).
        refine: the bracket ratio refinement stops at (> 1); ``math.inf``: no refinement.
    """

    def __init__(self, rungs, *, adaptive: bool, confirm: int = 2, refine: float = 1.25):
        if confirm < 1:
            raise ValueError(f"confirm must be >= 1, got {confirm}")
        if not refine > 1:
            raise ValueError(f"refine must be > 1, got {refine}")
        self.adaptive, self.confirm, self.refine = adaptive, confirm, refine
        self.rungs = sorted({float(r) for r in rungs}, key=self.fineness)
        if len(self.rungs) < 2:
            raise ValueError(f"a search needs at least 2 rungs to climb, got {list(rungs)}")
        #: setting -> True (independent), False (dependent or undetermined: the rule counts both as not independent)
        self.verdicts: dict[float, bool] = {}
        self.failed: float | None = None

    def fineness(self, value: float) -> float:
        """log(1/h): larger is finer (log steps; -log tol)."""
        return -math.log(value) if self.adaptive else math.log(value)

    def record(self, value: float, independent: bool) -> None:
        """The verdict of a trained setting (a ladder rung or a refinement point)."""
        self.verdicts[float(value)] = bool(independent)

    def fail(self, value: float) -> None:
        """A setting's trial failed: the search of this group stops there."""
        self.failed = float(value)

    def _climb(self) -> tuple[int, int]:
        """``(c, trained independent rungs from c on)``: the candidate critical rung's index and its support."""
        dependent = [i for i, r in enumerate(self.rungs) if self.verdicts.get(r) is False]
        c = dependent[-1] + 1 if dependent else 0
        support = 0
        for r in self.rungs[c:]:
            if self.verdicts.get(r) is not True:
                break
            support += 1
        return c, support

    def _bracket(self, c: int) -> tuple[float, float]:
        """The bracket's ends after refinement: the finest dependent and the next finer independent setting."""
        low, high = self.rungs[c - 1], self.rungs[c]
        inside = sorted((v for v in self.verdicts if self.fineness(low) < self.fineness(v) < self.fineness(high)), key=self.fineness)
        for v in inside:
            if self.verdicts[v] is False:
                low = v
        for v in reversed(inside):
            if self.fineness(v) > self.fineness(low) and self.verdicts[v] is True:
                high = v
        return low, high

    def ratio(self, coarse: float, fine: float) -> float:
        return math.exp(self.fineness(fine) - self.fineness(coarse))

    def _non_monotone(self) -> list[str]:
        known = sorted(self.verdicts, key=self.fineness)
        out = []
        for i, a in enumerate(known):
            if self.verdicts[a] is not True:
                continue
            finer_dependent = [b for b in known[i + 1:] if self.verdicts[b] is False]
            if finer_dependent:
                out.append(f"{self.label(a)} independent but {self.label(finer_dependent[-1])} dependent")
        return out

    def label(self, value: float) -> str:
        return f"tol {value:g}" if self.adaptive else f"{int(value)} steps"

    def state(self) -> LadderState:
        """Where the search stands (see :class:`LadderState`)."""
        notes = self._non_monotone()
        if self.failed is not None:
            return LadderState("done", "failed", None, None, None, notes, f"the trial of {self.label(self.failed)} failed")
        c, support = self._climb()
        n = len(self.rungs)
        if support < self.confirm:
            if c == n:
                return LadderState("done", "none", self.rungs[-1], None, None, notes,
                                   f"the finest rung ({self.label(self.rungs[-1])}) is solver-dependent")
            if c + support == n:  # independent to the end of the ladder, but fewer than confirm rungs
                dependent = self.rungs[c - 1] if c else None
                return LadderState("done", "unconfirmed", dependent, self.rungs[c], None, notes,
                                   f"the ladder ends after {support} independent rung(s) of the {self.confirm} that confirm")
            return LadderState("climb", "running", self.rungs[c - 1] if c else None, None, None, notes,
                               f"{support} of {self.confirm} rungs from {self.label(self.rungs[c])} on confirmed")
        if c == 0:
            return LadderState("done", "coarsest", None, self.rungs[0], None, notes,
                               f"the coarsest rung is confirmed by {support}: the critical step may be coarser")
        low, high = self._bracket(c)
        ratio = self.ratio(low, high)
        if ratio <= self.refine * (1 + 1e-9):
            why = f"bracket {self.label(low)} - {self.label(high)} (ratio {ratio:.3g} <= {self.refine:g})"
            return LadderState("done", "found", low, high, ratio, notes, why)
        if bisect(low, high, adaptive=self.adaptive) is None:
            why = f"bracket {self.label(low)} - {self.label(high)}: neighbouring whole step counts, nothing between"
            return LadderState("done", "found", low, high, ratio, notes, why)
        return LadderState("refine", "running", low, high, ratio, notes,
                           f"bracket {self.label(low)} - {self.label(high)} (ratio {ratio:.3g} > {self.refine:g}): bisect")

    def wanted(self, running=()) -> tuple[list[float], list[float]]:
        """``(needed, speculative)``: untrained settings the answer needs now, and those it may need
        next (each coarse to fine, the cheap first), given the settings ``running`` (in training:
        a refinement point goes into the widest part of the bracket that they leave)."""
        state = self.state()
        if state.phase == "done":
            return [], []
        running = {float(v) for v in running}
        if state.phase == "refine":
            return self._split(state.dependent, state.critical, running), []
        c, support = self._climb()
        window = self.rungs[c:c + self.confirm]
        needed = [r for r in window if r not in self.verdicts]
        speculative = [r for r in self.rungs[c + self.confirm:] if r not in self.verdicts]
        if c > 0 and support > 0:  # the candidate holds so far: the bracket's refinement is likely next
            speculative = self._split(*self._bracket(c), running) + speculative
        return needed, speculative

    def _split(self, low: float, high: float, running: set[float]) -> list[float]:
        """The next refinement point of the bracket ``low`` - ``high``: the middle of the widest gap
        that the points in training leave, if that gap is wider than ``refine`` (else none)."""
        inside = sorted((v for v in running if self.fineness(low) < self.fineness(v) < self.fineness(high)), key=self.fineness)
        ends = [low, *inside, high]
        gaps = sorted(zip(ends, ends[1:]), key=lambda g: -self.ratio(*g))
        for a, b in gaps:
            if self.ratio(a, b) <= self.refine * (1 + 1e-9):
                break
            middle = bisect(a, b, adaptive=self.adaptive)
            if middle is not None and middle not in self.verdicts and middle not in running:
                return [middle]
        return []

    def _inside_bracket(self, value: float) -> bool:
        """Whether ``value`` lies strictly inside the bracket being refined (or about to be)."""
        c, support = self._climb()
        if c == 0 or c >= len(self.rungs) or support == 0:
            return False
        low, high = self._bracket(c)
        return self.ratio(low, high) > self.refine * (1 + 1e-9) and self.fineness(low) < self.fineness(value) < self.fineness(high)

    def useful(self, value: float) -> bool:
        """Whether a setting in training should go on: its verdict is not known, the search is not
        done, and it is needed or speculative (:meth:`wanted`), or inside the bracket being
        refined (either verdict narrows it), or a ladder rung coarser than the candidate
        critical one (cheap, and it shows whether the ladder is monotone)."""
        value = float(value)
        if value in self.verdicts:
            return False
        if self.state().phase == "done":
            return False
        needed, speculative = self.wanted()
        if value in needed or value in speculative or self._inside_bracket(value):
            return True
        # A rung coarser than the candidate no longer moves the answer, but it is cheap and tells
        # whether the ladder is monotone: one in training finishes.
        c, _ = self._climb()
        return value in self.rungs and c < len(self.rungs) and self.fineness(value) < self.fineness(self.rungs[c])
