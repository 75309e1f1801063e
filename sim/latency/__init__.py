"""Latency models: constant, roofline and fitted (see base.py for the interface)."""

from __future__ import annotations

from sim.config import LatencyConfig
from sim.hardware import GPUSpec, ModelSpec
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


__all__ = ["KINDS", "ConstantLatency", "LatencyModel", "StepShape", "attn_pairs", "build"]
