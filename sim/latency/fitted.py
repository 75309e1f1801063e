"""Fitted latency: a six-coefficient regression of step time on the step's shape.

Why this form: each term is one cost a vLLM step really has, so the
coefficients mean something and extrapolate sanely to shapes outside the
profile, unlike a black-box regressor::

    t = max(per_token * num_tokens, weights_floor)   # GEMMs: compute, or reading the weights once
        + per_attn_pair * prefill_attn_pairs          # prefill attention FLOPs
        + per_kv_read_token * kv_read_tokens          # attention reads the KV cache (decodes and chunks)
        + per_seq * num_seqs                          # LM head / sampling / per-request CPU work
        + per_step                                    # scheduling, launches, fixed CPU work

All coefficients are non-negative, so the model is monotone in every field.
Below the knee (``num_tokens < weights_floor / per_token``) only the sum
``weights_floor + per_step`` is pinned down by data of pure-prefill and
pure-decode steps; mixed steps above the knee separate them. Read the two
together rather than as a clean "weights read" vs "CPU overhead" split.

Fitting minimises the *relative* error ``(pred - y) / y`` (so small decode
steps weigh as much as big prefills and MAPE is what is controlled). The
``max`` makes it piecewise linear: for a fixed knee ``k = weights_floor /
per_token`` the model is linear in the rest, so we grid-search ``k`` with
non-negative least squares (``scipy.optimize.nnls``) and then polish all six
coefficients together with ``scipy.optimize.least_squares`` (bounds >= 0).
Both steps are deterministic.

Quality is reported on held-out steps: a seeded random ``test_fraction`` of
the profile is set aside, the model is fitted on the rest, and the shipped
coefficients are exactly those, so the reported MAPE and R² describe them.

A fitted model is a JSON file (``sim/latency/models/NAME.json`` for shipped
ones) with ``coefficients``, ``provenance`` (gpu, model, engine, source,
the source's digest or a measurement's date, how derived, the profile's digest) and ``fit`` (seed, split sizes, held-out MAPE and R²).
An optional ``host`` object, ``{"per_step": s, "per_seq": s}``, says how much
of a step is CPU work (``host_time``); it is copied from the profile's
``host_per_step``/``host_per_seq`` lines, not fitted, because a step's total
time cannot tell CPU from GPU. Async scheduling overlaps that part with the
GPU (`sim/latency/base.py`); without it async steps are as long as
synchronous ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sim.hardware import json_key_line
from sim.latency.base import StepShape
from sim.textout import MAX_COUNT, brief
from sim.latency.profile import COPIED_KEYS, TENSOR_PARALLEL, Profile, ProfileError, ProfileRow, gpu_count, read_profile
from traces.argtypes import StrictParser, int_at_least, number, path_problem, positive_float
from traces.validate import TraceError, parse_json_int, unique_keys

MODELS_DIR = Path(__file__).parent / "models"
FORMAT = "autellix-fitted-latency v2"
# Formats read no longer, with why (a profile for v1 has no prefill_kv_tokens column to fit v2 from).
OLD_FORMATS = {"autellix-fitted-latency v1": "per_decode_kv_token charged decodes only for reading the KV cache; "
                                            "v2's per_kv_read_token charges prefill chunks' reads of their "
                                            "context too"}
COEFFICIENTS = ("per_token", "weights_floor", "per_attn_pair", "per_kv_read_token", "per_seq", "per_step")
HOST = ("per_step", "per_seq")  # keys of the optional "host" object
FORM = ("max(per_token*num_tokens, weights_floor) + per_attn_pair*prefill_attn_pairs "
        "+ per_kv_read_token*(decode_kv_tokens + prefill_kv_tokens) + per_seq*num_seqs + per_step")


class FitError(ValueError):
    """A fitted model file that is malformed, or a profile that cannot be fitted."""


@dataclass(frozen=True)
class FittedLatency:
    per_token: float
    weights_floor: float
    per_attn_pair: float
    per_kv_read_token: float
    per_seq: float
    per_step: float
    name: str = "fitted"
    provenance: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    fit: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    host_per_step: float = 0.0  # CPU seconds per step (see the module docstring)
    host_per_seq: float = 0.0  # CPU seconds per sequence in the step

    def __post_init__(self) -> None:
        for key in (*COEFFICIENTS, "host_per_step", "host_per_seq"):
            value = getattr(self, key)
            # An integer past a float's range made math.isfinite raise OverflowError (a traceback).
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0
                                               and (isinstance(value, float) or value <= MAX_COUNT)
                                               and math.isfinite(value)):
                what = f"host {key[5:]}" if key.startswith("host_") else f"coefficient {key}"
                raise FitError(f"fitted latency {self.name!r}: {what} must be a finite number >= 0, "
                               f"got {brief(value)}")
        smallest = StepShape(1, 1, 1, 1, 0, 0)  # one decode at context 0: the shortest step there is
        host, whole = self.host_per_step + self.host_per_seq, self.step_time(smallest)
        if host > whole:
            raise FitError(f"fitted latency {self.name!r}: host per_step + per_seq = {host:g} s exceeds the whole "
                           f"{whole:g} s of a one-sequence decode step; host time is the CPU part of a step "
                           f"(in seconds, not milliseconds)")

    def step_time(self, shape: StepShape) -> float:
        if not shape.num_seqs:
            return 0.0
        gemm = self.per_token * shape.num_tokens
        if gemm < self.weights_floor:
            gemm = self.weights_floor
        return (gemm + self.per_attn_pair * shape.prefill_attn_pairs
                + self.per_kv_read_token * (shape.decode_kv_tokens + shape.prefill_kv_tokens)
                + self.per_seq * shape.num_seqs + self.per_step)

    def host_time(self, shape: StepShape) -> float:
        if not shape.num_seqs:
            return 0.0
        return self.host_per_step + self.host_per_seq * shape.num_seqs

    def coefficients(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in COEFFICIENTS}

    def to_json(self) -> dict[str, Any]:
        out = {"format": FORMAT, "name": self.name, "form": FORM, "units": "seconds; per_X is seconds per unit of X",
               "coefficients": self.coefficients()}
        if self.host_per_step or self.host_per_seq:
            out["host"] = {"per_step": float(self.host_per_step), "per_seq": float(self.host_per_seq)}
        out.update(provenance=self.provenance, fit=self.fit)
        return out

    @classmethod
    def from_json(cls, raw: Any, origin: str = "<json>") -> "FittedLatency":
        if isinstance(raw, dict) and raw.get("format") in OLD_FORMATS:
            old = raw["format"]
            raise FitError(f"{origin}: \"format\": \"{old}\" is an older form ({OLD_FORMATS[old]}); profile the "
                           f"engine again (python -m engine profile, whose profile has the prefill_kv_tokens "
                           f"column) and fit that (python -m sim fit-latency)")
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise FitError(f"{origin}: not a fitted latency model (expected \"format\": \"{FORMAT}\")")
        coef = raw.get("coefficients")
        if not isinstance(coef, dict) or set(coef) != set(COEFFICIENTS):
            got = sorted(coef) if isinstance(coef, dict) else coef
            raise FitError(f"{origin}: \"coefficients\" must have exactly {', '.join(COEFFICIENTS)}; got {got}")
        host = raw.get("host", {})
        if not isinstance(host, dict) or not set(host) <= set(HOST):
            got = sorted(host) if isinstance(host, dict) else host
            raise FitError(f"{origin}: \"host\" must be an object with keys among {', '.join(HOST)} "
                           f"(CPU seconds per step and per sequence); got {got}")
        for key in ("provenance", "fit"):  # dict() of null, 5 or "abc" was a traceback or a message with no file
            if not isinstance(raw.get(key, {}), dict):
                raise FitError(f"{origin}: \"{key}\" must be a JSON object, got {json.dumps(raw[key])[:60]}")
        try:
            return cls(**coef, name=str(raw.get("name", Path(origin).stem)),
                       provenance=dict(raw.get("provenance", {})), fit=dict(raw.get("fit", {})),
                       host_per_step=host.get("per_step", 0.0), host_per_seq=host.get("per_seq", 0.0))
        except FitError as exc:
            raise FitError(f"{origin}: {exc}") from None


def available() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def load_fitted(name: str | None) -> FittedLatency:
    """A shipped model by name (``sim/latency/models/NAME.json``) or a JSON file by path."""
    if not name:
        raise ValueError(f"latency.name: the fitted kind needs a model name or .json path, got {name!r}; "
                         f"shipped: {', '.join(available())}")
    path = Path(name)
    if path.suffix != ".json" and len(path.parts) == 1:
        path = MODELS_DIR / f"{name}.json"
        if not path.exists():
            raise ValueError(f"latency.name: unknown fitted model {name!r}; valid choices: {', '.join(available())} "
                             f"(or a path to a .json file)")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text, parse_int=parse_json_int, object_pairs_hook=unique_keys)
    except TraceError as exc:  # unique_keys: json kept the last of a key given twice, silently
        raise FitError(f"{json_key_line(path, text, exc.field, 2)}: field {exc.field!r}: duplicate key") from None
    except RecursionError:
        raise FitError(f"{path}: malformed JSON: nested too deeply for a fitted model") from None
    except FileNotFoundError:
        raise ValueError(f"latency.name: no such fitted model file {str(path)!r}; shipped: "
                         f"{', '.join(available())}") from None
    except IsADirectoryError:
        raise ValueError(f"latency.name: {str(path)!r} is a directory, expected a fitted model .json file") from None
    except UnicodeDecodeError as exc:
        raise FitError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a fitted model JSON "
                       "(python -m sim fit-latency writes one)") from None
    except json.JSONDecodeError as exc:
        raise FitError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    return FittedLatency.from_json(raw, str(path))


# ---------------------------------------------------------------- fitting


def _design(rows: Sequence[ProfileRow]):
    import numpy as np

    x = np.array([[r.shape.num_tokens, r.shape.prefill_attn_pairs, r.shape.kv_read_tokens, r.shape.num_seqs]
                  for r in rows], dtype=float)
    y = np.array([r.seconds for r in rows], dtype=float)
    return x, y


def _predict(p, x):
    import numpy as np

    return np.maximum(p[0] * x[:, 0], p[1]) + p[2] * x[:, 1] + p[3] * x[:, 2] + p[4] * x[:, 3] + p[5]


def fit_coefficients(rows: Sequence[ProfileRow]) -> list[float]:
    """Non-negative relative-least-squares coefficients, in ``COEFFICIENTS`` order."""
    import numpy as np
    from scipy.optimize import least_squares, nnls

    x, y = _design(rows)
    n = x[:, 0]
    knees = np.unique(np.concatenate([[0.0], np.unique(n)]))
    if len(knees) > 200:
        knees = np.unique(np.quantile(knees, np.linspace(0, 1, 200)))
    best = None
    for k in knees:
        a = np.column_stack([np.maximum(n, k), x[:, 1], x[:, 2], x[:, 3], np.ones_like(n)]) / y[:, None]
        scale = np.where(a.max(axis=0) > 0, a.max(axis=0), 1.0)
        c, _ = nnls(a / scale, np.ones_like(y))
        c = c / scale
        p = np.array([c[0], c[0] * k, c[1], c[2], c[3], c[4]])
        sse = float(np.sum((_predict(p, x) / y - 1) ** 2))
        if best is None or sse < best[0]:
            best = (sse, p)
    sse0, p0 = best
    # Polish the knee jointly with the rest; scale parameters to O(1) for the solver.
    scale = np.where(p0 > 0, p0, np.maximum(p0.max(), 1e-12) * 1e-6)
    res = least_squares(lambda q: _predict(q * scale, x) / y - 1, np.where(p0 > 0, 1.0, 0.0),
                        bounds=(0, np.inf), method="trf", xtol=1e-14, ftol=1e-14, gtol=1e-14, max_nfev=2000)
    p1 = res.x * scale
    if float(np.sum((_predict(p1, x) / y - 1) ** 2)) < sse0:
        p0 = p1
    return [float(v) for v in p0]


def quality(model: FittedLatency, rows: Sequence[ProfileRow]) -> dict[str, float]:
    """MAPE (%), max APE (%) and R² of ``model`` on ``rows``."""
    pred = [model.step_time(r.shape) for r in rows]
    y = [r.seconds for r in rows]
    ape = [abs(p - t) / t for p, t in zip(pred, y)]
    mean = sum(y) / len(y)
    ss_tot = sum((t - mean) ** 2 for t in y)
    ss_res = sum((p - t) ** 2 for p, t in zip(pred, y))
    return {"mape_pct": 100 * sum(ape) / len(ape), "max_ape_pct": 100 * max(ape),
            "r2": 1 - ss_res / ss_tot if ss_tot > 0 else None, "points": len(rows)}


def split(rows: Sequence[ProfileRow], test_fraction: float, seed: int) -> tuple[list[ProfileRow], list[ProfileRow]]:
    """Deterministic (seeded) train/test split."""
    import numpy as np

    if not 0 < test_fraction < 1:
        raise FitError(f"test fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(rows))
    n_test = max(1, int(round(test_fraction * len(rows))))
    test = [rows[i] for i in sorted(order[:n_test])]
    train = [rows[i] for i in sorted(order[n_test:])]
    return train, test


def identifiability_problem(rows: Sequence[ProfileRow]) -> str | None:
    """Why some coefficients cannot be told apart by these steps, or None.

    The linear terms (tokens, attention pairs, KV tokens read, sequences, a
    constant) need steps that vary each independently; twenty copies of one
    shape fit "exactly" and then predict any other shape arbitrarily.
    """
    import numpy as np

    x, _ = _design(rows)
    columns = np.column_stack([x, np.ones(len(x))])
    rank = int(np.linalg.matrix_rank(columns / np.maximum(np.abs(columns).max(axis=0), 1e-300)))
    if rank >= columns.shape[1]:
        return None
    shapes = len({r.shape for r in rows})
    return (f"the profile's {shapes} distinct step shape(s) do not vary tokens, attention pairs, KV tokens read and "
            f"sequences independently (rank {rank} of {columns.shape[1]}): the coefficients of the terms they "
            f"cannot tell apart are arbitrary; profile more varied steps (python -m engine profile)")


def fit_profile(rows: Sequence[ProfileRow], name: str = "fitted", provenance: dict[str, Any] | None = None,
                test_fraction: float = 0.2, seed: int = 0,
                host: dict[str, float] | None = None) -> tuple[FittedLatency, dict[str, Any]]:
    """Fit on a seeded train split; the report holds train and held-out quality.

    ``host`` (``host_per_step``/``host_per_seq`` seconds) is carried into the
    model as given, not fitted.
    """
    min_train, min_test = 2 * len(COEFFICIENTS), 2  # two held-out steps at least, for an R²
    if not 0 < test_fraction < 1:
        raise FitError(f"test fraction must be in (0, 1), got {test_fraction}")

    def enough(n: int) -> bool:  # the split's own arithmetic (`split`)
        n_test = max(1, int(round(test_fraction * n)))
        return n - n_test >= min_train and n_test >= min_test

    if not enough(len(rows)):
        least = next((n for n in range(len(rows) + 1, 100_000) if enough(n)), None)
        if least is None:  # a share so small (or so large) that no profile leaves both sides their steps
            raise FitError(f"a held-out share of {test_fraction!r} leaves fewer than {min_test} test steps or "
                           f"{min_train} training steps in any profile of up to 100,000 steps; use a share such "
                           f"as 0.2")
        raise FitError(f"profile has {len(rows)} steps; fitting {len(COEFFICIENTS)} coefficients on {min_train} or "
                       f"more and testing on {min_test} or more, with a held-out share of {test_fraction:g}, needs "
                       f"at least {least}")
    train, test = split(rows, test_fraction, seed)
    coef = fit_coefficients(train)
    draft = FittedLatency(*coef, name=name)
    report = {
        "objective": "non-negative least squares on relative error (nnls knee grid, then least_squares polish)",
        "seed": seed,
        "test_fraction": test_fraction,
        "train": quality(draft, train),
        "heldout": quality(draft, test),
    }
    warning = identifiability_problem(rows)
    if warning:
        report["warning"] = warning
    model = FittedLatency(*coef, name=name, provenance=dict(provenance or {}), fit=report, **(host or {}))
    return model, report


def fit_command(profile_path: str | Path, out_path: str | Path, name: str | None = None,
                test_fraction: float = 0.2, seed: int = 0) -> tuple[FittedLatency, dict[str, Any]]:
    """Read a profile CSV, fit it, write the model JSON; returns the model and report."""
    output_problem = path_problem(str(out_path), "-o")
    if output_problem:  # before the fit, which takes a while: "Is a directory" then named no option
        raise FitError(output_problem)
    profile = read_profile(profile_path)
    _check_engine_named(profile, profile_path)
    name = name or Path(out_path).stem
    prov: dict[str, Any] = {k: profile.provenance[k] for k in COPIED_KEYS if k in profile.provenance}
    if TENSOR_PARALLEL in profile.provenance:
        prov[TENSOR_PARALLEL] = gpu_count(profile)
    prov["profile"] = Path(profile_path).name
    # The profile's digest rather than today's date: the same profile gives the same file.
    prov["profile_sha256"] = hashlib.sha256(Path(profile_path).read_bytes()).hexdigest()
    prov["fitted"] = "python -m sim fit-latency (sim.latency.fitted)"
    try:
        model, report = fit_profile(profile.rows, name, prov, test_fraction, seed, profile.host())
    except FitError as exc:  # "profile has 2 steps; ..." named no file
        raise FitError(f"{profile_path}: {exc}") from None
    try:
        Path(out_path).write_text(json.dumps(model.to_json(), indent=2) + "\n")
    except OSError as exc:
        raise FitError(f"-o {out_path}: cannot write the fitted model: {exc.strerror or exc}") from None
    return model, report


def _check_engine_named(profile: Profile, origin: str | Path) -> None:
    """The model and GPU the profile was taken on, which `sim.latency.build` checks the engine
    against: a profile without them fitted a model that then timed any engine at all."""
    for kind, example in (("model", "llama-3.1-8b"), ("gpu", "a100-80gb")):
        if not any(k in profile.provenance for k in (kind, f"{kind}_spec")):
            raise FitError(f"{origin}: no '# {kind}:' line (or '# {kind}_spec:') above the header; the fitted model "
                           f"records the {kind} it times, and is refused on another; add e.g. '# {kind}: {example}'")


def fit_latency_main(argv: list[str]) -> int:
    """``python -m sim fit-latency``: fit a profile CSV and report held-out MAPE and R²."""
    p = StrictParser(
        prog="python -m sim fit-latency",
        description="Fit the step-time regression to a latency profile CSV and write a fitted model JSON. "
                    "Prints MAPE and R² on held-out steps.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python -m engine profile -o a100.csv                      # on a GPU machine\n"
            "  python -m sim fit-latency a100.csv -o my-a100.json\n"
            "  python -m sim.latency.vidur ../shared/data/vidur-profiles/a100-llama-3-8b/mlp.csv \\\n"
            "      --model llama-3.1-8b --gpu a100-80gb -o vidur-a100.csv\n"
            "  python -m sim fit-latency vidur-a100.csv -o sim/latency/models/a100-llama-3.1-8b.json\n"
            "then use it with latency.kind=fitted, latency.name=my-a100.json (or a shipped name)."
        ),
    )
    p.add_argument("profile", help="profile CSV (format: sim/latency/profile.py)")
    p.add_argument("-o", "--output", required=True, help="fitted model JSON to write")
    p.add_argument("--name", help="model name stored in the JSON (default: the output file's stem)")
    p.add_argument("--test-fraction", type=number, default=0.2, help="held-out share of steps (default: %(default)s)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seed of the train/test split (default: %(default)s)")
    p.add_argument("--max-mape", type=positive_float, help="exit 1 if the held-out MAPE (%%) exceeds this")
    args = p.parse_args(argv)
    try:
        model, report = fit_command(args.profile, args.output, args.name, args.test_fraction, args.seed)
    except (ProfileError, FitError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if "warning" in report:
        print(f"warning: {report['warning']}", file=sys.stderr)
    h, t = report["heldout"], report["train"]
    r2 = "undefined (the held-out times do not vary)" if h["r2"] is None else f"{h['r2']:.4f}"
    print(f"held-out MAPE {h['mape_pct']:.2f}% (max {h['max_ape_pct']:.1f}%), R² {r2} "
          f"on {h['points']} steps; train MAPE {t['mape_pct']:.2f}% on {t['points']}")
    print("coefficients: " + ", ".join(f"{k}={v:.4g}" for k, v in model.coefficients().items()))
    print(f"wrote {args.output}")
    if args.max_mape is not None and h["mape_pct"] > args.max_mape:
        print(f"error: held-out MAPE {h['mape_pct']:.2f}% exceeds --max-mape {args.max_mape}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(fit_latency_main(sys.argv[1:]))
