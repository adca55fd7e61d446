"""
Lean reads: a decoding rule that reads only as many candidates per pass as recent passes
accepted (decode.py --lean, bench.py --lean).

Reading k_max candidates costs k_max-1 <MTP> slots even when one token is accepted, and on a
CPU even one extra slot costs most of a pass (a 2-row matmul is no matrix-vector product).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Lean:
    """Another decoding rule (decode.Static, decode.ConfAdapt, ...), whose passes read fewer
    candidates: after a pass that accepted a guess, one more than it accepted, or twice as many
    if it took them all (up to n_max); after one that accepted only its first candidate, one (a
    plain k=1 pass), probing with two again after 1, 3, 7, ... 31 such passes. The read state
    is (candidates, failed probes in a row, one-candidate passes since the last probe)."""
    rule: object

    @property
    def family(self):
        return self.rule.family + ", lean"

    @property
    def name(self):
        return self.rule.name + ", lean"

    def reads(self, k_max):
        return self.rule.reads(k_max)

    def accept(self, conf):
        return self.rule.accept(conf)

    def check(self):
        self.rule.check()

    def start(self, n_max):
        return n_max, 0, 0

    def adapt(self, state, take, n_max):
        slots, misses, idle = state
        if take >= 2:                                    # an <MTP> guess was accepted
            return min(n_max, 2 * slots) if take >= slots else take + 1, 0, 0
        if slots > 1:                                    # a probe (or a wide read) found nothing
            return 1, min(misses + 1, 5), 0
        idle += 1                                        # a k=1 pass; probe when its wait is over
        return (2, misses, 0) if idle >= 2 ** misses - 1 else (1, misses, idle)
