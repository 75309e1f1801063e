"""Latency models: constant, roofline and fitted (see base.py for the interface)."""

from __future__ import annotations

from sim.config import ExperimentConfig, LatencyConfig
from sim.hardware import GPUSpec, ModelSpec, load_gpu, load_model
from sim.latency.base import ConstantLatency, LatencyModel, StepShape, attn_pairs

KINDS = ("constant", "roofline", "fitted")


def build(cfg: LatencyConfig, model: ModelSpec, gpu: GPUSpec, gpus: int = 1) -> LatencyModel:
    """The latency model an experiment asks for, for one replica of ``gpus`` GPUs."""
    if cfg.kind == "constant":
        return ConstantLatency(cfg.seconds)
    if cfg.kind == "roofline":
        from sim.latency.roofline import RooflineLatency

        return RooflineLatency.from_specs(model, gpu, gpus, cfg)
    if cfg.kind == "fitted":
        from sim.latency.fitted import load_fitted

        return load_fitted(cfg.name)
    raise ValueError(f"latency.kind: unknown kind {cfg.kind!r}; valid choices: {', '.join(KINDS)}")


def async_without_host_note(cfg: ExperimentConfig) -> str | None:
    """A note for an async run whose latency model has no host time to hide, so async gains nothing.

    Such a run is legal (a constant model, or one fitted to a measured
    profile without host lines) but easy to misread as vLLM's async speed.
    """
    if not cfg.engine.async_scheduling:
        return None
    eng = cfg.engine
    model = build(cfg.latency, load_model(eng.model), load_gpu(eng.gpu), eng.gpus_per_replica)
    if model.host_time(StepShape(1, 1, 1, 1, 0, 0)) > 0:
        return None
    return (f"note: engine.async_scheduling is on, but latency model {model.name!r} has no host time, so async "
            "steps are as long as synchronous ones (docs/design-decisions.md, async scheduling)")


__all__ = ["KINDS", "ConstantLatency", "LatencyModel", "StepShape", "async_without_host_note", "attn_pairs", "build"]
