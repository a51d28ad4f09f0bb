"""Per-domain stratified reservoir: a quota of the capacity per domain, each stratum uniform.

Quotas are shares of the capacity among the domains seen so far, equal or by
configured weight (a domain not named weighs 1), rounded by largest remainders.
When a new domain first appears, quotas are recomputed and strata above their
new quota drop uniformly chosen members: a uniform sample thinned at random
stays a uniform sample, so a late domain gets its share at once and every
stratum stays uniform over its own domain's stream. A stratum's quota never
grows once its domain has been seen (a full stratum that grew would favour
what comes next); rounding slack goes to the newcomer.

Each stratum is an Algorithm L reservoir of its own (``AdmissionPlan``, its own
random stream), restarted from its law after thinning. Kept items stay packed
in slots ``0 .. len - 1``; ``members[d]`` lists stratum d's slots, so the plan's
slot ``i`` is ``members[d][i]``, and an eviction moves the last slots into the holes.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from everlearn.buffers.base import SlotBuffer
from everlearn.buffers.reservoir import AdmissionPlan, w_from_law


def quotas_for(weights: Sequence[float], capacity: int, old: Sequence[int] = ()) -> list[int]:
    """Largest-remainder shares of ``capacity`` by ``weights``; the first ``len(old)`` never exceed ``old``."""
    w = np.asarray(weights, dtype=np.float64)
    exact = capacity * w / w.sum()
    quotas = np.floor(exact).astype(int)
    for d in np.argsort(-(exact - quotas), kind="stable")[: capacity - int(quotas.sum())]:  # ties: seen first
        quotas[d] += 1
    slack = 0
    for d, cap in enumerate(old):
        if quotas[d] > cap:
            slack += int(quotas[d]) - cap
            quotas[d] = cap
    if slack:
        quotas[len(old)] += slack  # only called when a domain is new, so there is one at len(old)
    return quotas.tolist()


class StratifiedReservoir(SlotBuffer):
    kind = "stratified"

    def __init__(self, capacity: int, seq_len: int, seed: int = 0, dedup: bool = False,
                 domain_weights: dict[str, float] | None = None):
        super().__init__(capacity, seq_len, seed, dedup)
        if any(w <= 0 for w in (domain_weights or {}).values()):
            raise ValueError("domain weights must be > 0")
        self.domain_weights = dict(domain_weights or {})
        self.seen_by_domain: list[int] = []  # per domain id
        self.quotas: list[int] = []  # per domain id
        self.members: list[list[int]] = []  # per domain id: its slots, in the order its plan numbers them
        self.plans: list[AdmissionPlan] = []  # per domain id; started once the stratum is full
        self._rank = np.zeros(capacity, dtype=np.int64)  # per slot: its index in its stratum's members

    def _requota(self) -> None:
        known = len(self.quotas)
        names = self.slots.domains
        for d in range(known, len(names)):
            self.seen_by_domain.append(0)
            self.members.append([])
            self.plans.append(AdmissionPlan(self.seed, stream=d + 1))
        self.quotas = quotas_for([self.domain_weights.get(n, 1.0) for n in names], self.capacity, self.quotas)
        holes: list[int] = []
        for d in range(known):
            members, quota = self.members[d], self.quotas[d]
            if len(members) <= quota:
                continue
            drop = set(self._rng.choice(len(members), size=len(members) - quota, replace=False).tolist())
            holes += [s for r, s in enumerate(members) if r in drop]
            self.members[d] = [s for r, s in enumerate(members) if r not in drop]
            self._rank[self.members[d]] = np.arange(quota)
            if quota:  # thinned to a uniform sample of its domain: Algorithm L again from there
                n = self.seen_by_domain[d]
                self.plans[d].start(quota, n - 1, w=w_from_law(self._rng, quota, n))
        if holes:
            self._compact(holes)

    def _compact(self, holes: list[int]) -> None:
        """Free the ``holes`` and move the last kept slots into those below the new size."""
        if self.dedup:
            for h in holes:
                self._kept.pop(int(self.slots.hashes[h]), None)
        new_size = self._size - len(holes)
        gone = set(holes)
        low = sorted(h for h in gone if h < new_size)
        high = [s for s in range(new_size, self._size) if s not in gone]
        s = self.slots
        for src, dst in zip(high, low, strict=True):
            s.tokens[dst], s.lengths[dst], s.domain_ids[dst], s.hashes[dst] = s.tokens[src], s.lengths[src], s.domain_ids[src], s.hashes[src]
            d, r = int(s.domain_ids[src]), int(self._rank[src])
            self.members[d][r] = dst
            self._rank[dst] = r
            if self.dedup:
                self._kept[int(s.hashes[src])] = dst
        self._size = new_size

    def add_many(self, items: Sequence[np.ndarray] | np.ndarray, domains: Sequence[str] | None = None,
                 weights: Sequence[float] | None = None) -> None:
        items, domains, hashes = self._prepare(items, domains, weights)
        n = len(items)
        dom_ids = np.asarray(self._domain_ids(domains, range(n)), dtype=np.int64)
        if len(self.quotas) < len(self.slots.domains):  # new domains: their share now
            self._requota()
        for d in np.unique(dom_ids).tolist():
            where = np.flatnonzero(dom_ids == d)  # this domain's items, in stream order
            members, quota, seen = self.members[d], self.quotas[d], self.seen_by_domain[d]
            fill = min(len(where), quota - len(members))
            if fill > 0:  # the stratum fills in stream order
                slots = range(self._size, self._size + fill)
                self._rank[slots.start : slots.stop] = np.arange(len(members), len(members) + fill)
                self._store_many(slots, where[:fill].tolist(), items, domains, hashes)
                members.extend(slots)
                self._size += fill
                if len(members) == quota:
                    self.plans[d].start(quota, seen + fill - 1)
            if quota and len(members) == quota and fill < len(where):  # Algorithm L within the stratum
                positions, plan_slots = self.plans[d].admissions(seen + len(where))
                chosen = dict(zip(plan_slots, positions, strict=True))  # a later admission to a slot wins
                self._store_many([members[i] for i in chosen], [int(where[p - seen]) for p in chosen.values()],
                                 items, domains, hashes)
            self.seen_by_domain[d] = seen + len(where)
        self._seen += n

    def state_dict(self) -> dict[str, Any]:
        state = self._state({"seen_by_domain": self.seen_by_domain, "quotas": self.quotas,
                             "domain_weights": self.domain_weights, "plans": [p.state() for p in self.plans]})
        state["arrays"]["rank"] = self._rank[: self._size].copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta = self._load(state)
        self.seen_by_domain = [int(x) for x in meta["seen_by_domain"]]
        self.quotas = [int(x) for x in meta["quotas"]]
        dom = self.slots.domain_ids[: self._size]
        self._rank[:] = 0
        if "rank" in state["arrays"]:
            self._rank[: self._size] = state["arrays"]["rank"]
        else:  # a state from before plans: number each stratum's slots in slot order
            for d in range(len(self.quotas)):
                where = np.flatnonzero(dom == d)
                self._rank[where] = np.arange(len(where))
        self.members = [[0] * int(c) for c in np.bincount(dom, minlength=len(self.quotas))]
        for slot, (d, r) in enumerate(zip(dom.tolist(), self._rank[: self._size].tolist(), strict=True)):
            self.members[d][r] = slot
        plan_states = meta.get("plans") or [None] * len(self.quotas)
        self.plans = []
        for d, plan_state in enumerate(plan_states):
            plan = AdmissionPlan(self.seed, stream=d + 1)
            if plan_state is not None:
                plan.load(plan_state)
            elif self.quotas[d] and len(self.members[d]) == self.quotas[d]:  # full, without a plan: W from its law
                n = self.seen_by_domain[d]
                plan.start(self.quotas[d], n - 1, w=w_from_law(self._rng, self.quotas[d], n))
            self.plans.append(plan)
