"""Cascade escalations in a replay. The gateway sends a cascade group's request to the cheapest
fitting candidate, verifies the answer (`policy.cascade.verify`, optionally a judge model) and, if
it fails, sends the request to the next step of the routed chain; every step is metered.

A trace rarely records the cheap model's answer, so each verified step's verdict comes from, in
order: the trace's recorded verdict (`cascade_escalated`, written by `margin export trace` for a
first step, used where the replay serves the recorded model); the group's deterministic checks
(`verify_regex`, `verify_json`: the gateway's own `cascade.verify`) on the recorded `response`
where the recorded model answered it and the group has no judge; else the escalation rate:
`replay.cascade_escalation_rate` (one value or per group), by default the ledger's
(escalated / first steps that answered, counted per group in the trace header by `margin export
trace`). A rate r escalates round(r x n) of a group's n rate-decided steps, spread evenly in
arrival order (the k-th escalates when floor((k+1)r + 1/2) > floor(kr + 1/2)): a deterministic
replay whose escalation spend is the expected one, to one request."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from margin.policy import cascade as cascade_policy
from margin.replay.outcome import Outcome

DETERMINISTIC = ("verify_regex", "verify_json")


class Cascades:
    def __init__(self, o: Outcome):
        self.o = o
        pol, tr = o.policy, o.trace
        self.groups = {name: g for name, g in pol.groups.items() if g.strategy == "cascade"}
        recorded = tr.attr("model")
        self.recorded = ([pol.settings.model_map.get(m, m) for m in recorded.tolist()] if recorded is not None
                         else None)
        self.rates: dict[str, tuple[Fraction, str]] = {g: self._rate(g) for g in self.groups}
        self.k = dict.fromkeys(self.groups, 0)
        for g, (rate, source) in self.rates.items():
            o.cascade[g] = {"verified": 0, "escalated": 0, "by_recorded": 0, "by_checks": 0, "by_rate": 0,
                            "rate": float(rate) if source != "none" else None,
                            "rate_source": source}

    def _rate(self, group: str) -> tuple[Fraction, str]:
        s = self.o.policy.settings.cascade_escalation_rate
        if isinstance(s, dict) and group in s:
            return Fraction(s[group]), "setting"
        if s is not None and not isinstance(s, dict):
            return Fraction(s), "setting"
        counts = (self.o.trace.meta.get("cascade") or {}).get(group) or {}
        steps, escalated = int(counts.get("steps") or 0), int(counts.get("escalated") or 0)
        if steps > 0:
            return Fraction(min(escalated, steps), steps), "ledger"
        return Fraction(0), "none"

    def chain(self, i: int) -> tuple[int, ...]:
        """The routed steps (model indices) of request ``i``, or () when it is not a cascade's."""
        o = self.o
        if o.forced or not self.groups:
            return ()
        if o.calls[int(o.combo[i])].requested_model not in self.groups:
            return ()
        return o.routed.chains[int(o.routed.chain[i])] if o.routed.chains else ()

    def escalates(self, i: int, step: int, model: int) -> bool:
        """The verdict on request ``i``'s answer by ``model`` at cascade step ``step`` (0: the first)."""
        o, tr = self.o, self.o.trace
        name = o.calls[int(o.combo[i])].requested_model
        group = self.groups[name]
        st: dict[str, Any] = o.cascade[name]
        st["verified"] += 1
        answered_by_recorded = self.recorded is not None and self.recorded[i] == o.models[model]
        checks = not group.verify_judge and any(getattr(group, c) for c in DETERMINISTIC)
        response = tr.responses[i] if tr.responses is not None else None
        if step == 0 and tr.escalated is not None and tr.escalated[i] >= 0 and answered_by_recorded:
            st["by_recorded"] += 1
            out = bool(tr.escalated[i])
        elif response is not None and answered_by_recorded and checks:
            st["by_checks"] += 1
            out = not cascade_policy.verify(response, group.verify_regex, group.verify_json)[0]
        else:
            st["by_rate"] += 1
            rate, k = self.rates[name][0], self.k[name]
            self.k[name] = k + 1
            p, q = rate.numerator, rate.denominator  # floor(x p/q + 1/2) in integers (Fraction is slow)
            out = (2 * (k + 1) * p + q) // (2 * q) > (2 * k * p + q) // (2 * q)
        st["escalated"] += int(out)
        return out

    def notes(self) -> list[str]:
        out = []
        for name, st in self.o.cascade.items():
            if not st["verified"]:
                continue
            src = {"setting": "replay.cascade_escalation_rate", "ledger": "the ledger's rate (trace header)",
                   "none": "no rate known: set replay.cascade_escalation_rate; none escalated"}[st["rate_source"]]
            out.append(f"cascade {name}: {st['escalated']} of {st['verified']} verified steps escalated "
                       f"({st['by_recorded']} recorded verdicts, {st['by_checks']} by the group's checks on the "
                       f"recorded answer, {st['by_rate']} at rate {st['rate'] or 0} from {src}); each step is "
                       "priced on the request's recorded tokens")
        return out
