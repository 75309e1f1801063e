"""The error a run raises when its trace cannot run on its engine configuration.

It lives apart from `sim.simulate` so that the replica model, which
`sim.simulate` imports, can raise it too. The CLI and the sweep runner turn
it into one line naming the problem and what to change.
"""


class SimulationError(ValueError):
    """The trace cannot run on this engine configuration (e.g. a call larger than the KV cache)."""
