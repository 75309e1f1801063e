"""The process table: one entry per live program.

The scheduler reads a program's attained service, waiting time and engine
affinity from here. Programs do not announce their end (an agent may call
again after minutes of tool time), so an entry is dropped only when the
program has no live call and has been idle for ``ttl`` seconds. The
simulator knows when a program ends and may drop it at once.
"""

from __future__ import annotations

from collections.abc import Container

from sim.core.state import ProgramState


class ProcessTable:
    def __init__(self, ttl: float):
        self.ttl = ttl
        self.programs: dict[str, ProgramState] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self.programs)

    def __contains__(self, program_id: str) -> bool:
        return program_id in self.programs

    def get(self, program_id: str) -> ProgramState | None:
        return self.programs.get(program_id)

    def get_or_create(self, program_id: str, now: float) -> ProgramState:
        entry = self.programs.get(program_id)
        if entry is None:
            self._seq += 1
            entry = ProgramState(id=program_id, seq=self._seq, first_arrival=now, last_arrival=now)
            self.programs[program_id] = entry
        return entry

    def last_activity(self, entry: ProgramState) -> float:
        return max(entry.last_arrival, entry.last_completion)

    def expire(self, now: float, arriving: Container[str] = ()) -> list[str]:
        """Drop idle programs; returns their ids in table order.

        ``arriving`` names programs with a call the engine has received but
        not yet registered (the simulated replica adds calls between steps):
        such a program is not idle, and dropping it would lose the service
        its next call is ranked by.
        """
        gone = [
            pid
            for pid, e in self.programs.items()
            if not e.live and now - self.last_activity(e) >= self.ttl and pid not in arriving
        ]
        for pid in gone:
            del self.programs[pid]
        return gone

    def remove(self, program_id: str) -> None:
        """Forget a program that is known to be finished (it must have no live call)."""
        entry = self.programs.get(program_id)
        if entry is None:
            raise KeyError(f"unknown program {program_id!r}")
        if entry.live:
            raise ValueError(f"program {program_id!r} still has live calls: {sorted(entry.live)}")
        del self.programs[program_id]
