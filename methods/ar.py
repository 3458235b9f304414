"""Autoregressive baseline: the drafter that never drafts.

Every step verifies only the last emitted token, so the decode loop reduces to plain AR decoding
(greedy or sampling) on the same engine, cache and timers as every speculative method — the
speedup denominator is measured with the same machinery as the numerator.
"""

from __future__ import annotations

from dataclasses import dataclass

from decodebench.engine.drafting import Drafter


class AutoregressiveDrafter(Drafter):
    @dataclass
    class Params:
        pass

    def __init__(self, params: AutoregressiveDrafter.Params):
        self.params = params
