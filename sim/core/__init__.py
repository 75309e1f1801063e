"""The shared scheduler core: policies, process table, load balancers.

Standard library only (a test enforces it): the simulator's engine model and
the vLLM scheduler plugin import this package verbatim and call the same
functions once per engine step. The core is time-agnostic: callers pass the
current time and the service each call received.
"""
