"""Token accounting: what an answer cost its API key.

A chat's tokens are held against its key's quota at admission (a :class:`flow.events.Reservation`);
when the answer ends (or the client leaves, or the stream breaks) :meth:`Accounting.count` turns
the hold into the tokens used: counted in the metrics, settled in this replica's admission
(:class:`deployments.admission.Admission`: the key's cached quota snapshot) and written to the
usage ledger in the background (:meth:`flow.calls.StageCalls.record_usage`). A request that ends
with nothing generated releases its hold with :meth:`Accounting.settle`.
"""

from __future__ import annotations

from deployments.admission import Admission
from flow.calls import StageCalls
from flow.events import Prepared, Reservation


class Accounting:
    def __init__(self, calls: StageCalls, admission: Admission) -> None:
        self.calls, self.admission = calls, admission

    def settle(self, reservation: Reservation | None, used: int = 0, cost: float = 0.0) -> bool:
        """Release a quota reservation made at admission (once), counting ``used`` tokens. False when
        there was none to release."""
        if reservation is None or reservation.settled:
            return False
        reservation.settled = True
        self.admission.settle(reservation.key_id, reservation.tokens, used, cost)
        return True

    def record(self, key_id: str | None, prompt_tokens: int, completion_tokens: int,
               engine_s: dict[str, float] | None = None) -> None:
        """Usage of a request that held nothing: noted in this replica's quota snapshot, and written
        to the ledger."""
        self.admission.note_usage(key_id, prompt_tokens + completion_tokens,
                                  self.admission.cost(prompt_tokens, completion_tokens))
        self.calls.record_usage(key_id, prompt_tokens, completion_tokens, engine_s)

    def count(self, prep: Prepared, usage: dict[str, int]) -> None:
        """An answer's tokens (``usage``: prompt and completion tokens), charged to its key once."""
        metrics = self.calls.metrics
        metrics.generation_tokens.labels("prompt").inc(usage["prompt_tokens"])
        metrics.generation_tokens.labels("completion").inc(usage["completion_tokens"])
        p, c, engine_s = usage["prompt_tokens"], usage["completion_tokens"], prep.trace.engine_s
        if self.settle(prep.reservation, p + c, self.admission.cost(p, c)):
            # the reservation turned into the usage it covered (settle noted it): only the ledger is left
            self.calls.record_usage(prep.key_id, p, c, engine_s)
        else:
            self.record(prep.key_id, p, c, engine_s)
