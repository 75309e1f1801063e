"""The shared scheduler core: policies, process table, load balancers.

Standard library only (a test enforces it): the simulator's engine model and
the vLLM scheduler plugin import this package verbatim and call the same
functions once per engine step. The core is time-agnostic: callers pass the
current time and the service each call received.
"""

from sim.core.balancer import LeastUsed, Locality, RoundRobin, make_balancer
from sim.core.expiries import Expiries
from sim.core.params import PolicyParams
from sim.core.policies import ATLAS, FCFS, MLFQ, PLAS, POLICY_CLASSES, SRPT, Policy, ProgramFCFS, make_policy
from sim.core.process_table import ProcessTable
from sim.core.scheduler import SchedulerCore, TokenBudget
from sim.core.service import attribute_service
from sim.core.state import CallState, ProgramState

__all__ = [
    "ATLAS", "FCFS", "MLFQ", "PLAS", "POLICY_CLASSES", "SRPT", "CallState", "Expiries", "LeastUsed", "Locality",
    "Policy", "PolicyParams", "ProgramFCFS", "ProcessTable", "ProgramState", "RoundRobin", "SchedulerCore", "TokenBudget",
    "attribute_service", "make_balancer", "make_policy",
]
