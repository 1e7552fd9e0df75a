"""How the layer stack is grouped for `jax.lax.scan`, so compile time does not grow with depth.

A layer's kind is (attention type, FFN type). The plan finds one periodic block of the kind
sequence (the release: 7 x [global, swa x 5] for layers 5..46) and scans over its repeats; inside
a period, and outside it, runs of equal kinds are scanned too. Every run is one compiled layer body.
"""

from __future__ import annotations

import dataclasses
import itertools

LayerKind = tuple[str, str]  # (attention type, mlp type)


@dataclasses.dataclass(frozen=True)
class Run:
    kind: LayerKind
    offset: int  # first layer of the run, relative to the start of its period
    length: int


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int  # first layer of the segment
    repeats: int
    runs: tuple[Run, ...]

    @property
    def period(self) -> int:
        return sum(r.length for r in self.runs)

    def layer_index(self, repeat: int, run: Run, i: int) -> int:
        return self.start + repeat * self.period + run.offset + i


def _runs(kinds) -> tuple[Run, ...]:
    runs, offset = [], 0
    for kind, group in itertools.groupby(kinds):
        n = len(list(group))
        runs.append(Run(kind, offset, n))
        offset += n
    return tuple(runs)


def plan_layers(kinds: tuple[LayerKind, ...]) -> tuple[Segment, ...]:
    """Segments covering `kinds` in order, minimising the number of distinct runs (compiled bodies)."""
    n = len(kinds)
    best = (len(_runs(kinds)), 0, n, 0, 1)  # (cost, -coverage, start, period, repeats): no periodic block
    for period in range(1, n // 2 + 1):
        for start in range(0, n - 2 * period + 1):
            repeats = 1
            while start + (repeats + 1) * period <= n and (
                kinds[start + repeats * period : start + (repeats + 1) * period] == kinds[start : start + period]
            ):
                repeats += 1
            if repeats < 2:
                continue
            end = start + repeats * period
            cost = len(_runs(kinds[:start])) + len(_runs(kinds[start : start + period])) + len(_runs(kinds[end:]))
            candidate = (cost, -repeats * period, start, period, repeats)
            if candidate < best:
                best = candidate
    _, _, start, period, repeats = best
    if period == 0:
        pieces = [(0, 1, kinds)]
    else:
        end = start + repeats * period
        pieces = [(0, 1, kinds[:start]), (start, repeats, kinds[start : start + period]), (end, 1, kinds[end:])]
    return tuple(Segment(s, r, _runs(k)) for s, r, k in pieces if k)
