"""Latency profile CSV: measured (or derived) step times, one row per engine step.

A profile is what a fitted latency model is fitted to. It has two sources: our
own profiler on a real GPU (``python -m engine profile``) and Vidur's published
per-operator timings turned into whole steps (``python -m sim.latency.vidur``).
Both write the same format so one fitter serves both.

Format (UTF-8 text)::

    # autellix-latency-profile v2
    # gpu: NVIDIA A100-SXM4-80GB
    # gpu_spec: a100-80gb
    # model: llama-3.1-8b
    # engine: vllm 0.26.0
    # source: python -m engine profile
    # date: 2026-01-01
    # derived: measured, median of 5 timed steps per shape
    num_seqs,num_tokens,num_decode,decode_kv_tokens,prefill_tokens,prefill_attn_pairs,prefill_kv_tokens,seconds
    1,2048,0,0,2048,2098176,2048,0.1432
    64,64,64,64064,0,0,0,0.0231

* Leading lines starting with ``#`` are provenance, ``# key: value`` each (the
  first, ``# autellix-latency-profile v2``, names the format; a ``#`` line
  without a colon is a comment). The keys are those in ``KEYS``, each given
  once: ``gpu``, ``model`` (or ``gpu_spec``, ``model_spec``: the spec names,
  where ``gpu``/``model`` is a device's own name), ``tensor_parallel`` (GPUs
  per replica, an integer, 1 when absent), ``engine``, ``source``,
  ``source_sha256`` (a derived profile's input file), ``date`` (a
  measurement's) and ``derived``, which the fitter copies into the fitted
  model's provenance, and the two host keys below. Another key is refused:
  the fitter would drop it from the provenance without a word.
* Then one header line with exactly the columns in ``COLUMNS`` (any order),
  then one row per step. The seven shape columns are non-negative integers with
  the meaning of :class:`sim.latency.base.StepShape`; ``seconds`` is the step's
  wall time, a positive finite number. (v1 had no ``prefill_kv_tokens``, the
  KV prefill chunks read, which a step's sums cannot give back: such a
  profile is refused with that said; profile again.)
* Two provenance keys are numbers the fitter uses: ``host_per_step`` and
  ``host_per_seq`` (seconds, each optional, 0 when absent) say how much of
  each step's time is CPU work, ``host_per_step + host_per_seq * num_seqs``.
  The fitted model keeps them so async scheduling can overlap that part with
  the GPU (`sim/latency/base.py`). Vidur-derived profiles write the CPU
  overhead they assume; a measured profile has none unless it is added.
* Blank lines are ignored; ``#`` lines after the header are not allowed (a
  comment in the middle of the data is more likely a damaged file).

The reader validates everything and raises :class:`ProfileError` with
``file:line: column: problem`` so a CLI can print one clear line.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from sim.latency.base import StepShape
from sim.records import number_of
from sim.textout import MAX_COUNT

FORMAT_PREFIX = "# autellix-latency-profile "  # then the version
FORMAT_LINE = FORMAT_PREFIX + "v2"
SHAPE_COLUMNS = (
    "num_seqs",
    "num_tokens",
    "num_decode",
    "decode_kv_tokens",
    "prefill_tokens",
    "prefill_attn_pairs",
    "prefill_kv_tokens",
)
COLUMNS = SHAPE_COLUMNS + ("seconds",)
HOST_KEYS = ("host_per_step", "host_per_seq")  # provenance keys read as numbers
# Provenance the fitter copies into the model: each may be given once.
COPIED_KEYS = ("gpu", "model", "gpu_spec", "model_spec", "engine", "source", "source_sha256", "date", "derived")
# GPUs per replica the profile was taken on (copied as an integer); `sim.latency` checks it.
TENSOR_PARALLEL = "tensor_parallel"
# Every key a profile may give. Keys were free form, and the fitter dropped any other
# from the fitted model's provenance without a word (``# colour: blue`` fitted, exit 0).
KEYS = (*COPIED_KEYS, TENSOR_PARALLEL, *HOST_KEYS)
# A measured step lies between a kernel launch and an hour; a time outside is
# corrupt or in the wrong unit, and times near a float's limits overflow the
# fit's sums of squares.
MIN_STEP_SECONDS = 1e-6
MAX_STEP_SECONDS = 3600.0
# MAX_COUNT (sim.textout): the fit works in floats, so a count past 2**53 would be
# rounded, and one near 10**154 overflows its sums of squares.


class ProfileError(ValueError):
    """A profile file that is missing, malformed, truncated or inconsistent."""


@dataclass(frozen=True)
class ProfileRow:
    shape: StepShape
    seconds: float


@dataclass
class Profile:
    rows: list[ProfileRow]
    provenance: dict[str, str] = field(default_factory=dict)

    def host(self) -> dict[str, float]:
        """The ``HOST_KEYS`` given in the provenance, as seconds (validated by ``parse_profile``)."""
        return {k: float(self.provenance[k]) for k in HOST_KEYS if k in self.provenance}


def _shown(text: str, quoted: bool = True) -> str:
    """A cell for an error message: whole when short (quoted unless it reads as a number), else its start and length."""
    if len(text) <= 40:
        return repr(text) if quoted else text
    return f"{text[:20]!r}... ({len(text)} characters)"


def _fields(line: str, origin: str, lineno: int) -> list[str]:
    try:
        return next(csv.reader([line]))
    except csv.Error as exc:  # a field past the csv module's size limit, a NUL byte
        raise ProfileError(f"{origin}:{lineno}: not a CSV line ({exc})") from None


def _near_host_key(key: str) -> bool:
    """Whether ``key`` looks meant as a host key (``host_per_stp``, ``Host-Per-Step``): keys
    are free-form, but one of these two is a number the fitter uses."""
    import difflib

    folded = key.lower().replace("-", "_").replace(" ", "_")
    # host_per_call, host_per_token: a CPU time per something, surely meant as one of the two
    return (folded in HOST_KEYS or folded.startswith("host_per_")
            or bool(difflib.get_close_matches(folded, HOST_KEYS, n=1, cutoff=0.85)))


def shape_problem(s: StepShape) -> str | None:
    """Why a shape cannot be a real engine step, or None if it can.

    Checked on read so a hand-edited or truncated-number row (``640`` where
    ``64064`` was meant) is caught rather than silently fitted.
    """
    if s.num_seqs < 1:
        return "num_seqs: a measured step has at least one sequence"
    if s.num_decode > s.num_seqs:
        return "num_decode: larger than num_seqs"
    if s.num_tokens != s.num_decode + s.prefill_tokens:
        return "num_tokens: must equal num_decode + prefill_tokens"
    n_prefill = s.num_seqs - s.num_decode
    if n_prefill == 0 and (s.prefill_tokens or s.prefill_attn_pairs or s.prefill_kv_tokens):
        col = "prefill_tokens" if s.prefill_tokens else "prefill_attn_pairs" if s.prefill_attn_pairs \
            else "prefill_kv_tokens"
        return f"{col}: non-zero but every sequence is a decode"
    if n_prefill and s.prefill_tokens < 2 * n_prefill:
        return "prefill_tokens: each prefill chunk has at least 2 tokens"
    if s.prefill_attn_pairs < s.prefill_tokens:
        return "prefill_attn_pairs: smaller than prefill_tokens"
    if s.prefill_kv_tokens < s.prefill_tokens:
        return "prefill_kv_tokens: smaller than prefill_tokens (each chunk reads its context and its own KV)"
    if s.prefill_attn_pairs > s.prefill_tokens * s.prefill_kv_tokens:
        return ("prefill_attn_pairs: larger than prefill_tokens x prefill_kv_tokens (a chunk's new tokens each "
                "attend to at most its context and itself)")
    # Each chunk has >= 2 new tokens, each attending to all its context: pairs >= 2 x context + new per chunk.
    if s.prefill_attn_pairs < 2 * (s.prefill_kv_tokens - s.prefill_tokens) + s.prefill_tokens:
        return ("prefill_kv_tokens: more context than prefill_attn_pairs allows (each chunk's two or more new "
                "tokens attend to all of its context)")
    if s.decode_kv_tokens < s.num_decode:
        return "decode_kv_tokens: smaller than num_decode (each decode reads >= 1 KV token)"
    return None


def parse_profile(text: str, origin: str = "<profile>") -> Profile:
    """Parse profile text; ``origin`` names the file in error messages."""
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if first.startswith(FORMAT_PREFIX) and first != FORMAT_LINE:
        old = " (its chunks' KV reads, prefill_kv_tokens, are not in it)" if first == FORMAT_PREFIX + "v1" else ""
        raise ProfileError(f"{origin}:1: {first[2:]} is not this reader's format, {FORMAT_LINE[2:]}{old}; "
                           "profile the engine again (python -m engine profile)")
    provenance: dict[str, str] = {}
    key_lines: dict[str, int] = {}
    host: dict[str, tuple[float, int]] = {}  # key -> (seconds, line)
    i = 0
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
        line = lines[i].strip().lstrip("#").strip()
        if ":" in line:
            key, value = line.split(":", 1)
            key, value = key.strip(), value.strip()
            where = f"{origin}:{i + 1}: {key}"
            if key in key_lines:  # the last was kept: two gpu lines
                raise ProfileError(f"{where}: repeated (first on line {key_lines[key]}); give each key once")
            key_lines[key] = i + 1
            if key in HOST_KEYS:
                host[key] = (_host_seconds(value, where), i + 1)
            elif key == TENSOR_PARALLEL:
                _gpu_count(value, where)
            elif _near_host_key(key):  # a near miss would be ignored, and the host time be 0
                raise ProfileError(f"{where}: misspelt host key; expected {' or '.join(HOST_KEYS)}")
            elif key not in KEYS:
                raise ProfileError(f"{where}: unknown key; valid keys: {', '.join(KEYS)} (a comment line "
                                   "has no colon)")
            provenance[key] = value
        i += 1
    if i == len(lines):
        raise ProfileError(f"{origin}: empty profile: no header line with columns {','.join(COLUMNS)}")
    header_lineno = i + 1
    header = [c.strip() for c in _fields(lines[i], origin, header_lineno)]
    missing = [c for c in COLUMNS if c not in header]
    if missing == ["prefill_kv_tokens"]:
        raise ProfileError(f"{origin}:{header_lineno}: missing column prefill_kv_tokens (the KV cache prefill chunks "
                           "read, their context and themselves), which a v1 profile lacks and its other columns "
                           "cannot give back; profile the engine again (python -m engine profile)")
    if missing:
        raise ProfileError(f"{origin}:{header_lineno}: missing column(s) {', '.join(missing)}; "
                           f"expected {','.join(COLUMNS)}")
    unknown = [c for c in header if c not in COLUMNS]
    if unknown or len(set(header)) != len(header):
        raise ProfileError(f"{origin}:{header_lineno}: unexpected or repeated column(s) "
                           f"{', '.join(unknown) or 'duplicates'}; expected {','.join(COLUMNS)}")
    rows: list[ProfileRow] = []
    row_lines: list[int] = []
    for lineno, line in enumerate(lines[i + 1 :], start=header_lineno + 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            raise ProfileError(f"{origin}:{lineno}: comment line inside the data (provenance goes above the header)")
        values = _fields(line, origin, lineno)
        if len(values) != len(header):
            raise ProfileError(f"{origin}:{lineno}: expected {len(header)} fields, got {len(values)} "
                               f"(truncated or malformed row)")
        rec = dict(zip(header, (v.strip() for v in values)))
        ints = {}
        for col in SHAPE_COLUMNS:
            text = rec[col].strip()
            digits = text.lstrip("+-")
            if digits.isdigit() and len(digits.lstrip("0")) > 20:  # past 2**53; int() refuses past 4300 digits
                bound = "must be >= 0" if text.startswith("-") else "must be at most 2**53"
                raise ProfileError(f"{origin}:{lineno}: column {col}: {bound}, got {_shown(text)}")
            value = number_of(text, int)  # int() took "1_0" as 10, and other scripts' digits
            if value is None:
                raise ProfileError(f"{origin}:{lineno}: column {col}: expected an integer, got {_shown(text)}")
            ints[col] = value
            if ints[col] < 0:
                raise ProfileError(f"{origin}:{lineno}: column {col}: must be >= 0, got {_shown(str(ints[col]))}")
            if ints[col] > MAX_COUNT:
                raise ProfileError(f"{origin}:{lineno}: column {col}: must be at most 2**53, got {_shown(text)}")
        seconds = number_of(rec["seconds"], float)
        if seconds is None:
            raise ProfileError(f"{origin}:{lineno}: column seconds: expected a number, got {_shown(rec['seconds'])}")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ProfileError(f"{origin}:{lineno}: column seconds: must be a positive finite time, "
                               f"got {_shown(rec['seconds'], quoted=False)}")
        if not MIN_STEP_SECONDS <= seconds <= MAX_STEP_SECONDS:
            raise ProfileError(
                f"{origin}:{lineno}: column seconds: expected a step time from {MIN_STEP_SECONDS:g} to "
                f"{MAX_STEP_SECONDS:g} s, got {_shown(rec['seconds'], quoted=False)} (times are in seconds)"
            )
        shape = StepShape(**ints)
        problem = shape_problem(shape)
        if problem:
            col, msg = problem.split(": ", 1)
            raise ProfileError(f"{origin}:{lineno}: column {col}: {msg}")
        rows.append(ProfileRow(shape, seconds))
        row_lines.append(lineno)
    if not rows:
        raise ProfileError(f"{origin}: no data rows after the header (truncated file?)")
    if host:
        per_step, per_seq = (host.get(k, (0.0, 0))[0] for k in HOST_KEYS)
        for row, lineno in zip(rows, row_lines):
            cpu = per_step + per_seq * row.shape.num_seqs
            if cpu > row.seconds:
                times = {"host_per_step": "", "host_per_seq": f" x {row.shape.num_seqs} sequences"}
                given = " + ".join(f"{k} {v:g} s{times[k]} (line {line})" for k, (v, line) in host.items())
                raise ProfileError(f"{origin}:{lineno}: column seconds: the step's host time, {given} = {cpu:g} s, "
                                   f"exceeds its measured {row.seconds:g} s; host time is the CPU part of a step")
    return Profile(rows, provenance)


def _host_seconds(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ProfileError(f"{where}: expected a number of seconds >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ProfileError(f"{where}: expected a number of seconds >= 0, got {text!r}")
    return value


def _gpu_count(text: str, where: str) -> int:
    """A ``tensor_parallel`` value: the GPUs of one replica, an integer >= 1."""
    value = number_of(text, int)
    if value is None or not 1 <= value <= MAX_COUNT:
        raise ProfileError(f"{where}: expected the GPUs per replica, an integer >= 1, got {_shown(text)}")
    return value


def gpu_count(profile: Profile) -> int | None:
    """The profile's ``tensor_parallel`` as an integer (validated by ``parse_profile``), or None."""
    text = profile.provenance.get(TENSOR_PARALLEL)
    return None if text is None else _gpu_count(text, TENSOR_PARALLEL)


def read_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Excel's "CSV UTF-8") hid the header's first column
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: cannot read profile: {exc}") from None
    return parse_profile(text, str(path))


def format_profile(profile: Profile) -> str:
    out = io.StringIO()
    out.write(FORMAT_LINE + "\n")
    for key, value in profile.provenance.items():
        if "\n" in key or "\n" in value or ":" in key:
            raise ValueError(f"provenance entry {key!r} must be one line and its key must not contain ':'")
        out.write(f"# {key}: {value}\n")
    out.write(",".join(COLUMNS) + "\n")
    for row in profile.rows:
        s = row.shape
        out.write(",".join(str(getattr(s, c)) for c in SHAPE_COLUMNS) + f",{row.seconds!r}\n")
    return out.getvalue()


def write_profile(path: str | Path, profile: Profile) -> None:
    Path(path).write_text(format_profile(profile), encoding="utf-8")
