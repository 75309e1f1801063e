"""Latency models: constant, roofline and fitted (see base.py for the interface)."""

from __future__ import annotations

from sim.config import EngineConfig, ExperimentConfig, LatencyConfig
from sim.hardware import GPUSpec, ModelSpec, available as specs_available, load_gpu, load_model
from sim.latency.base import ConstantLatency, LatencyModel, StepShape, attn_pairs

KINDS = ("constant", "roofline", "fitted")


class FittedElsewhere(ValueError):
    """A fitted model whose provenance names another model, GPU or GPU count than the engine's."""


def build(cfg: LatencyConfig, model: ModelSpec, gpu: GPUSpec, gpus: int = 1) -> LatencyModel:
    """The latency model an experiment asks for, for one replica of ``gpus`` GPUs."""
    if cfg.kind == "constant":
        return ConstantLatency(cfg.seconds)
    if cfg.kind == "roofline":
        from sim.latency.roofline import RooflineLatency

        return RooflineLatency.from_specs(model, gpu, gpus, cfg)
    if cfg.kind == "fitted":
        from sim.latency.fitted import load_fitted

        fitted = load_fitted(cfg.name)
        problem = _fitted_elsewhere(fitted.provenance, model, gpu, gpus)
        if problem:
            raise FittedElsewhere(f"{fitted.name!r} {problem}")
        return fitted
    raise ValueError(f"latency.kind: unknown kind {cfg.kind!r}; valid choices: {', '.join(KINDS)}")


# The range a step time must lie in at the probe shapes below. No GPU step
# takes less than a microsecond (a kernel launch alone costs several), and
# the engine rounds step times to 2**-30 s, so a shorter one would become a
# zero-length step; an hour per step is a units slip (a bandwidth in TB/s
# given as bytes/s), not a GPU. The same bounds as a measured profile's steps.
MIN_STEP_SECONDS = 1e-6
MAX_STEP_SECONDS = 3600.0
# The largest prefill probed: a typical token budget, so an unbounded budget
# in a queueing-theory check is not taken for a units slip.
PROBE_PREFILL_TOKENS = 8192


def step_time_problem(model: LatencyModel, max_num_batched_tokens: int) -> str | None:
    """What is wrong with ``model``'s step times, probed at a one-token decode and a budget-wide
    prefill; None when both lie in [MIN_STEP_SECONDS, MAX_STEP_SECONDS].

    A model whose steps came out at infinity stopped a run mid-way with an
    OverflowError; one below the clock's grid ran steps of zero length and
    reported latencies of 0 s; a units slip ran "successfully" for 10**12 s.
    """
    prefill = min(max_num_batched_tokens, PROBE_PREFILL_TOKENS)
    for what, shape in (("a one-token decode", StepShape.from_batch([(1, 0)])),
                        (f"a {prefill}-token prefill", StepShape.from_batch([(prefill, 0)]))):
        seconds = model.step_time(shape)
        if not MIN_STEP_SECONDS <= seconds <= MAX_STEP_SECONDS:  # also nan
            return (f"latency model {model.name!r} gives {seconds:.3g} s for {what}; a step must take from "
                    f"{MIN_STEP_SECONDS:g} to {MAX_STEP_SECONDS:g} s (check the units of its inputs)")
    return None


def swap_time_problem(model: ModelSpec, gpu: GPUSpec, gpus: int, block_size: int) -> str | None:
    """What is wrong with the time to swap one KV block over the host link, as the engine
    computes it (`sim.replica.Replica`); None when it lies in [MIN_STEP_SECONDS, MAX_STEP_SECONDS].

    The GPU spec's ``pcie_bandwidth`` only had to be positive: 25 (GB/s given as
    bytes/s) ran a swap run to program latencies of 10**8 s, and 5e-324 made the
    transfer infinite and stopped the run with an OverflowError. A block is the
    smallest transfer, one copy call, which takes microseconds as a kernel does.
    """
    nbytes = block_size * model.kv_bytes_per_token_on(gpus)
    try:
        seconds = nbytes / (gpu.pcie_bandwidth * gpus)
    except (OverflowError, ZeroDivisionError):
        seconds = float("inf")
    if MIN_STEP_SECONDS <= seconds <= MAX_STEP_SECONDS:  # also nan
        return None
    links = f" x {gpus} GPUs" if gpus > 1 else ""
    return (f"swapping one {block_size}-token KV block of {model.name} ({nbytes:,} bytes) at {gpu.pcie_bandwidth:g} "
            f"bytes/s{links} takes {seconds:.3g} s; a block's swap must take from {MIN_STEP_SECONDS:g} to "
            f"{MAX_STEP_SECONDS:g} s (the bandwidth is in bytes/s: 25 GB/s is 25e9)")


def timing_problem(eng: EngineConfig, model: ModelSpec, gpu: GPUSpec, latency: LatencyModel) -> str | None:
    """A step or (under swap preemption) a block swap outside the engine's time bounds:
    `step_time_problem`, then `swap_time_problem`; recompute never swaps."""
    problem = step_time_problem(latency, eng.max_num_batched_tokens)
    if problem is None and eng.preemption_mode == "swap":
        problem = swap_time_problem(model, gpu, eng.gpus_per_replica, eng.block_size)
    return problem


def _named(provenance: dict, kind: str) -> str | None:
    """The ``model`` or ``gpu`` a fitted model's provenance names: the spec name
    (``model_spec``/``gpu_spec``, as `engine.profile` records them beside a device's own
    name, "NVIDIA H100 80GB HBM3") where given, else the plain ``model``/``gpu``."""
    for key in (f"{kind}_spec", kind):
        value = provenance.get(key)
        if value is not None:
            return value if isinstance(value, str) else str(value)
    return None


def _fitted_elsewhere(provenance: dict, model: ModelSpec, gpu: GPUSpec, gpus: int) -> str | None:
    """Why a fitted model does not time this engine, from the model, GPU and GPU count its
    provenance records (one GPU unless it says ``tensor_parallel``); None if it does, or names
    neither a model nor a GPU (a hand-made file; `sim fit-latency` always records both).

    Its coefficients are that engine's step times: an 8B-on-A100 fit timed a
    70B over four GPUs at 8B speed while the KV cache was sized for 70B. A name
    that is not the engine's is another GPU (or model) even when no spec has
    it: ``gpu: v100`` timed an A100 without a word.
    """
    fitted_for = (_named(provenance, "model"), _named(provenance, "gpu"), provenance.get("tensor_parallel", 1))
    if fitted_for[0] is None and fitted_for[1] is None:
        return None
    engine = (model.name, gpu.name, gpus)
    if all(want is None or want == got for want, got in zip(fitted_for, engine)):
        return None
    why = (f"was fitted to {fitted_for[0] or 'a model'} on {fitted_for[2]} x {fitted_for[1] or 'a GPU'}, not this engine's "
           f"{engine[0]} on {engine[2]} x {engine[1]}; fit one to a profile of this engine (python -m sim "
           f"fit-latency), or use latency.kind roofline")
    unnamed = [kind for kind, named in (("model", fitted_for[0]), ("gpu", fitted_for[1]))
               if named is not None and f"{kind}_spec" not in provenance and named not in specs_available(kind)]
    if unnamed:
        # A device's own name ("NVIDIA H200") is never a spec's: a profile of this engine taken on a GPU
        # `engine.profile` has no spec name for needs the spec named in the profile, then fitted again.
        why += ("; a profile names the spec it was taken on with " + " and ".join(f"a '# {k}_spec:' line" for k in unnamed)
                + " (a GPU or model no shipped spec describes needs its own spec file, given by path: engine.gpu: "
                "my.gpu.json)")
    return why


def latency_notes(cfg: ExperimentConfig) -> list[str]:
    """Notes on an experiment's latency model that a run prints before it starts: legal
    set-ups that are easy to misread (`async_without_host_note`, `unchecked_fitted_note`)."""
    return [note for note in (async_without_host_note(cfg), unchecked_fitted_note(cfg)) if note]


def unchecked_fitted_note(cfg: ExperimentConfig) -> str | None:
    """A note for a fitted model whose provenance names neither a model nor a GPU.

    `sim fit-latency` always records both, and `build` refuses a model
    fitted to another engine; a hand-made file that names neither cannot be
    checked, and timing a 70B with 8B coefficients would pass unseen.
    """
    if cfg.latency.kind != "fitted":
        return None
    from sim.latency.fitted import load_fitted

    fitted = load_fitted(cfg.latency.name)
    if _named(fitted.provenance, "model") is not None or _named(fitted.provenance, "gpu") is not None:
        return None
    eng = cfg.engine
    return (f"note: fitted latency model {fitted.name!r} names neither a model nor a GPU in its provenance, so "
            f"nothing checks that it times this engine ({eng.model} on {eng.gpus_per_replica} x {eng.gpu}); add "
            "\"model\" and \"gpu\" to its \"provenance\" to have it checked")


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


__all__ = ["KINDS", "ConstantLatency", "FittedElsewhere", "LatencyModel", "StepShape", "async_without_host_note", "attn_pairs", "build",
           "latency_notes", "step_time_problem", "swap_time_problem", "timing_problem", "unchecked_fitted_note"]
