"""A fair queue: round-robin across teams, first come first served within a team."""

from __future__ import annotations

import heapq


class FairQueue:
    """Pops the oldest job of the team served least recently (teams never served first).

    With team A holding jobs a1, a2, a3 and team B then submitting b1, the order is
    a1, b1, a2, a3: one team's backlog cannot starve another's. ``seq`` orders jobs (and breaks
    ties between teams): the submission order, kept across restarts.
    """

    def __init__(self) -> None:
        self._heaps: dict[str, list[tuple[int, str]]] = {}
        self._team_of: dict[str, str] = {}
        self._last_served: dict[str, int] = {}
        self._tick = 0

    def __len__(self) -> int:
        return len(self._team_of)

    def __contains__(self, ref: object) -> bool:
        return ref in self._team_of

    def push(self, ref: str, team: str | None, seq: int) -> None:
        if ref in self._team_of:
            return
        key = team or ""
        self._team_of[ref] = key
        heapq.heappush(self._heaps.setdefault(key, []), (seq, ref))

    def remove(self, ref: str) -> bool:
        key = self._team_of.pop(ref, None)
        if key is None:
            return False
        heap = self._heaps[key]
        heap[:] = [item for item in heap if item[1] != ref]
        heapq.heapify(heap)
        if not heap:
            del self._heaps[key]
        return True

    def _next_team(self) -> str | None:
        best: tuple[int, int, str] | None = None
        for key, heap in self._heaps.items():
            cand = (self._last_served.get(key, -1), heap[0][0], key)
            if best is None or cand < best:
                best = cand
        return best[2] if best else None

    def peek(self) -> str | None:
        key = self._next_team()
        return self._heaps[key][0][1] if key is not None else None

    def pop(self) -> str | None:
        key = self._next_team()
        if key is None:
            return None
        heap = self._heaps[key]
        _, ref = heapq.heappop(heap)
        if not heap:
            del self._heaps[key]
        del self._team_of[ref]
        self._tick += 1
        self._last_served[key] = self._tick
        return ref

    def order(self) -> list[str]:
        """The refs in the order they would be popped now (does not change the queue)."""
        clone = FairQueue()
        clone._heaps = {k: list(v) for k, v in self._heaps.items()}
        clone._team_of = dict(self._team_of)
        clone._last_served = dict(self._last_served)
        clone._tick = self._tick
        out = []
        while (ref := clone.pop()) is not None:
            out.append(ref)
        return out
