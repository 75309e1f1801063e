"""``python -m engine profile``: measure real vLLM step times over a grid of batch shapes.

Why: the simulator's fitted latency model is only as good as its profile.
This command drives vLLM (pinned ``vllm==0.26.0``) step by step on a real
GPU, constructs batches of known shape (pure prefill chunks, pure decode
batches, mixed steps), times each ``LLMEngine.step()`` and writes one row per
timed step in our profile CSV format (``sim/latency/profile.py``), with the
GPU name, vLLM version and date as provenance. Then
``python -m sim fit-latency PROFILE.csv -o MODEL.json``.

How a shape is made (all with unique random token ids, so nothing is shared
by accident):

* **Pure prefill** of chunks ``(new, ctx)``: a warm-up request of the ``ctx``
  prefix runs first (untimed), then a request of ``prefix + new`` tokens with
  ``max_tokens=1``. Prefix caching is **on** for exactly this: it is the only
  way to get a chunk of ``new`` tokens after ``ctx`` cached ones in a single
  step (with it off, a context can only come from earlier chunks of the same
  prompt, whose size is the token budget). ``RequestOutput.num_cached_tokens``
  confirms the hit; a step whose hit or progress differs from the plan is
  dropped and counted, never recorded with a wrong shape.
* **Pure decode** of ``B`` sequences at context ``C``: ``B`` prompts of ``C``
  tokens with a large ``max_tokens``; untimed steps until each has its first
  token; then ``repeats`` timed steps. Each row's contexts come from each
  request's tokens so far (context = ``C + generated - 1``), and a step counts
  only if every request advanced by exactly one token.
* **Mixed**: a decode batch as above, plus one prefill chunk added just
  before the timed step.

Timing: the engine core must run in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set before vLLM is imported), so
``step()`` runs schedule + forward + sample synchronously and wall time is
the step's time including its CPU overhead, as the simulator's step is.
Async scheduling is turned off for the same reason. A whole step's time
does not say how much of it was CPU work, so the profile has no
``host_per_step``/``host_per_seq`` lines (`sim/latency/profile.py`) and
async runs on the fitted model keep whole step times unless they are
added. CUDA graphs stay on (vLLM's default) so decode steps are timed as
served.

Weights are random (``load_format="dummy"``) from a ``config.json`` this
command writes for Llama-3.1-8B (no hub access needed); step time does not
depend on weight values. With ``ignore_eos`` no request stops early.

Its flags, ``-o`` and ``--workdir`` are checked first (exit 2, naming the
flag), so neither a run of hours nor a machine without a GPU hides a bad one.
Without a GPU (torch or vllm missing, or no CUDA device) it exits 1 with a
one-line message. The runner itself (:class:`StepRunner`) talks to the engine
only through ``add_request``/``step``/``abort_request``, so its shape
bookkeeping is tested here with a fake engine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sim.latency.base import StepShape
from sim.latency.profile import Profile, ProfileRow, write_profile
from traces.argtypes import fraction, int_at_least, int_between, path_problem

VLLM_VERSION = "0.26.0"

# meta-llama/Llama-3.1-8B config.json (the fields vLLM reads); weights are dummy.
LLAMA_31_8B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "vocab_size": 128256,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "use_cache": True,
    "transformers_version": "4.43.0",
}
MAX_MODEL_LEN = LLAMA_31_8B_CONFIG["max_position_embeddings"]  # vLLM refuses a longer max_model_len
MAX_SEED = 2 ** 32 - 1  # vLLM seeds numpy with it, which takes 0 to 2**32 - 1
TOKEN_RANGE = (1000, 128000)  # ordinary vocabulary ids, clear of special tokens
MAX_UNTIMED_STEPS = 20_000


class ProfileMismatch(RuntimeError):
    """The engine did not run the planned shape (kept out of the profile)."""


# ---------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Case:
    """One planned shape: ``decode_batch`` decodes at ``decode_ctx`` plus prefill ``chunks``."""

    decode_batch: int = 0
    decode_ctx: int = 0
    chunks: tuple[tuple[int, int], ...] = ()  # (new, ctx) per prefill request

    @property
    def kind(self) -> str:
        return "mixed" if self.decode_batch and self.chunks else ("decode" if self.decode_batch else "prefill")

    def tokens(self) -> int:
        return self.decode_batch + sum(n for n, _ in self.chunks)

    def kv_tokens(self, extra: int) -> int:
        return self.decode_batch * (self.decode_ctx + extra) + sum(n + c for n, c in self.chunks)


def profile_cases(max_tokens: int = 8192, max_seqs: int = 256, kv_tokens: int = 400_000,
                  quick: bool = False, max_model_len: int = 32768) -> list[Case]:
    """The grid: pure prefill (chunk size x cached context, and k equal chunks),
    pure decode (batch x context), mixed (decode batch + one chunk).

    Contexts are multiples of the 16-token block so prefix-cache hits are exact.
    ``quick`` is a ~5x smaller grid for a smoke run.
    """
    if quick:
        chunk_sizes, ctxs, batches, dctxs = (64, 512, 2048), (0, 2048), (1, 16, 64), (256, 2048)
    else:
        chunk_sizes = (16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
        ctxs = (0, 1024, 4096, 16384)
        batches = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
        dctxs = (32, 128, 512, 1024, 2048, 4096, 8192)
    cases = [Case(chunks=((n, c),)) for n in chunk_sizes for c in ctxs]
    cases += [Case(chunks=((n, 0),) * k) for k in (2, 4, 8) for n in (128, 512, 1024)]
    cases += [Case(b, c) for b in batches for c in dctxs]
    for b in (batches[:3] if quick else (4, 16, 64, 128)):
        for c in ((512,) if quick else (512, 2048)):
            for n in ((256, 1024) if quick else (128, 512, 2048, max_tokens - b)):
                for pc in ((0,) if quick else (0, 2048)):
                    cases.append(Case(b, c, ((n, pc),)))
    return [k for k in cases
            if 0 < k.tokens() <= max_tokens and k.decode_batch + len(k.chunks) <= max_seqs
            and k.kv_tokens(64) <= kv_tokens
            and k.decode_ctx + 512 < max_model_len and all(n + c < max_model_len for n, c in k.chunks)]


# ---------------------------------------------------------------- running


@dataclass
class _Req:
    prompt: int
    generated: int = 0
    finished: bool = False
    cached: int | None = None


@dataclass
class StepRunner:
    """Builds planned batches on an engine and times single steps.

    ``engine`` needs ``add_request(request_id, prompt, params)``, ``step()``
    returning RequestOutput-like objects (``request_id``, ``finished``,
    ``outputs[0].token_ids`` cumulative, ``num_cached_tokens``) and
    ``abort_request(ids)``; ``params(max_tokens)`` makes sampling params.
    """

    engine: Any
    params: Callable[[int], Any]
    repeats: int = 3
    seed: int = 0
    token_budget: int = 8192  # the engine's max_num_batched_tokens
    clock: Callable[[], float] = time.perf_counter
    dropped: int = 0
    _rng: random.Random = field(init=False)
    _reqs: dict[str, _Req] = field(init=False, default_factory=dict)
    _next: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def tokens(self, n: int) -> list[int]:
        return [self._rng.randrange(*TOKEN_RANGE) for _ in range(n)]

    def _add(self, prompt: list[int], max_tokens: int) -> str:
        rid = f"p{self._next}"
        self._next += 1
        self.engine.add_request(rid, {"prompt_token_ids": prompt}, self.params(max_tokens))
        self._reqs[rid] = _Req(len(prompt))
        return rid

    def _step(self) -> float:
        t0 = self.clock()
        outs = self.engine.step()
        dt = self.clock() - t0
        for out in outs:
            # Some vLLM releases append "-<suffix>" to the id internally; ours contain no "-".
            req = self._reqs.get(out.request_id) or self._reqs.get(str(out.request_id).split("-")[0])
            if req is None:
                continue
            req.generated = len(out.outputs[0].token_ids) if out.outputs else req.generated
            req.finished = bool(out.finished)
            cached = getattr(out, "num_cached_tokens", None)
            if cached is not None:
                req.cached = cached
        return dt

    def _until(self, done: Callable[[], bool]) -> None:
        for _ in range(MAX_UNTIMED_STEPS):
            if done():
                return
            self._step()
        raise ProfileMismatch("engine made no progress")

    def _drain(self) -> None:
        live = [r for r, q in self._reqs.items() if not q.finished]
        if live:
            self.engine.abort_request(live)
        for _ in range(MAX_UNTIMED_STEPS):
            if not self.engine.has_unfinished_requests():
                break
            self.engine.step()
        self._reqs.clear()

    def _prefix(self, ctx: int) -> list[int]:
        """A ``ctx``-token prefix, run once (untimed) so it is in the prefix cache."""
        prefix = self.tokens(ctx)
        if ctx:
            rid = self._add(prefix, 1)
            self._until(lambda: self._reqs[rid].finished)
        return prefix

    def run(self, case: Case) -> list[ProfileRow]:
        """Time ``repeats`` steps of ``case``; rows whose shape did not happen are dropped."""
        rows: list[ProfileRow] = []
        try:
            # Enough tokens to outlive the case's untimed and timed steps, few enough that a decode
            # batch ends soon even if an abort is lost; one that ends early fails the check, not the row.
            life = 64 + 2 * self.repeats + 2 * (case.kv_tokens(0) // self.token_budget + 1)
            decodes = [self._add(self.tokens(case.decode_ctx), life) for _ in range(case.decode_batch)]
            self._until(lambda: all(self._reqs[r].generated >= 1 for r in decodes))
            prefixes = [self._prefix(ctx) for _, ctx in case.chunks]
            for _ in range(self.repeats):
                chunk_ids = [self._add(p + self.tokens(n), 1) for p, (n, _) in zip(prefixes, case.chunks)]
                before = {r: self._reqs[r].generated for r in decodes}
                seconds = self._step()
                shape = self._check(case, decodes, before, chunk_ids)
                if shape is None:
                    self.dropped += 1
                    self._until(lambda: all(self._reqs[r].finished for r in chunk_ids))
                    continue
                rows.append(ProfileRow(shape, seconds))
        finally:
            self._drain()
        return rows

    def _check(self, case: Case, decodes: Sequence[str], before: dict[str, int],
               chunk_ids: Sequence[str]) -> StepShape | None:
        batch = []
        for r in decodes:
            if self._reqs[r].generated != before[r] + 1:
                return None
            batch.append((1, case.decode_ctx + before[r] - 1))
        for r, (n, ctx) in zip(chunk_ids, case.chunks):
            q = self._reqs[r]
            if not q.finished or q.generated != 1 or (q.cached is not None and q.cached != ctx):
                return None
            batch.append((n, ctx))
        return StepShape.from_batch(batch)


# ---------------------------------------------------------------- the command


def gpu_problem() -> str | None:
    """Why this machine cannot profile, as one line; None if it can."""
    try:
        import torch
    except ImportError:
        return f"torch is not installed; run on a GPU machine after `pip install vllm=={VLLM_VERSION}`"
    except Exception as exc:  # a broken install must not traceback
        return f"torch failed to import: {type(exc).__name__}: {exc}"
    try:
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible (torch.cuda.is_available() is False); run this on a GPU machine"
    except Exception as exc:
        return f"cannot query CUDA: {type(exc).__name__}: {exc}"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return f"vllm is not installed; `pip install vllm=={VLLM_VERSION}`"
    except Exception as exc:
        return f"vllm failed to import: {type(exc).__name__}: {exc}"
    return None


def write_model_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA_31_8B_CONFIG, indent=2) + "\n")
    return path


def _make_llm(args: argparse.Namespace, model_dir: Path):
    # Engine core in-process, so step() is synchronous. Forced, not a default: with a
    # machine's own VLLM_ENABLE_V1_MULTIPROCESSING=1, step() timed waits on a queue while
    # the engine core ran on its own, and nothing said so.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import dataclasses

    from vllm import LLM
    from vllm.engine.arg_utils import EngineArgs

    kwargs: dict[str, Any] = dict(
        model=str(model_dir), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
        enable_prefix_caching=True, enable_chunked_prefill=True,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
        enforce_eager=args.enforce_eager, seed=args.seed,
    )
    if "async_scheduling" in {f.name for f in dataclasses.fields(EngineArgs)}:
        kwargs["async_scheduling"] = False
    return LLM(**kwargs)


def _sampling_params_factory():
    from vllm import SamplingParams

    try:
        from vllm.sampling_params import RequestOutputKind

        kind = {"output_kind": RequestOutputKind.CUMULATIVE}
    except ImportError:
        kind = {}

    def make(max_tokens: int):
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False, temperature=0.0, **kind)

    return make


def profile_on_gpu(args: argparse.Namespace) -> Profile:
    import torch
    import vllm

    if vllm.__version__ != VLLM_VERSION:
        print(f"warning: vllm {vllm.__version__} is installed; this profiler targets {VLLM_VERSION}",
              file=sys.stderr)
    model_dir = write_model_dir(Path(args.workdir or tempfile.mkdtemp(prefix="autellix-profile-")))
    llm = _make_llm(args, model_dir)
    engine = llm.llm_engine
    cache = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
    blocks = getattr(cache, "num_gpu_blocks", None)
    kv_tokens = blocks * cache.block_size if blocks else 400_000
    cases = profile_cases(args.max_num_batched_tokens, args.max_num_seqs, int(kv_tokens * 0.9), args.quick,
                          args.max_model_len)
    runner = StepRunner(engine, _sampling_params_factory(), repeats=args.repeats, seed=args.seed,
                        token_budget=args.max_num_batched_tokens)
    warm = StepRunner(engine, runner.params, repeats=1, seed=args.seed + 1, token_budget=args.max_num_batched_tokens)
    rows: list[ProfileRow] = []
    for i, case in enumerate(cases, 1):
        warm.run(case)  # first run of a shape pays compilation / allocator warm-up
        got = runner.run(case)
        rows += got
        med = statistics.median(r.seconds for r in got) * 1e3 if got else float("nan")
        print(f"[{i}/{len(cases)}] {case.kind:7s} {case}: {len(got)} steps, median {med:.2f} ms", file=sys.stderr)
    device = torch.cuda.get_device_name(0)
    provenance = {
        "gpu": device,
        "model": "llama-3.1-8b (config.json written by engine.profile; dummy weights)",
        # The spec names a fitted model is checked against (sim.latency: a fit times only its own engine).
        "model_spec": "llama-3.1-8b",
        **({"gpu_spec": spec} if (spec := gpu_spec_of(device)) else {}),
        "engine": f"vllm {vllm.__version__}",
        "source": "python -m engine profile",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "derived": (f"measured wall time of LLMEngine.step() (in-process engine core, CUDA graphs "
                    f"{'off' if args.enforce_eager else 'on'}), {args.repeats} timed steps per shape after one "
                    f"untimed warm-up run; max_num_batched_tokens={args.max_num_batched_tokens}, "
                    f"max_num_seqs={args.max_num_seqs}; {runner.dropped} steps dropped (shape not as planned)"),
    }
    return Profile(rows, provenance)


# Substrings of CUDA device names and the GPU spec each is (sim/specs/).
GPU_SPECS_BY_DEVICE = (("H100", "h100"), ("A100-SXM4-80GB", "a100-80gb"), ("A100 80GB", "a100-80gb"))


def gpu_spec_of(device: str) -> str | None:
    """The shipped GPU spec a CUDA device name is, or None (then a fit of its profile is not checked)."""
    return next((spec for part, spec in GPU_SPECS_BY_DEVICE if part in device), None)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "profile",
        help="measure vLLM step times on this GPU into a latency profile CSV",
        description="Measure real vLLM step times over a grid of batch shapes (needs a CUDA GPU and "
                    f"vllm=={VLLM_VERSION}) and write a latency profile CSV for `python -m sim fit-latency`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("examples:\n"
                "  python -m engine profile -o a100.csv\n"
                "  python -m engine profile --quick -o smoke.csv\n"
                "  python -m sim fit-latency a100.csv -o a100-measured.json"),
    )
    # Every value is range-checked here, by argparse: a bad one was passed on to vLLM after the
    # GPU check, or (without a GPU) hidden behind "no CUDA GPU is visible".
    positive = int_at_least(1)
    p.add_argument("-o", "--output", required=True, help="profile CSV to write")
    p.add_argument("--repeats", type=positive, default=3, help="timed steps per shape (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small grid, for a smoke run")
    p.add_argument("--max-num-batched-tokens", type=positive, default=8192, help="token budget (default: %(default)s)")
    p.add_argument("--max-num-seqs", type=positive, default=256, help="(default: %(default)s)")
    p.add_argument("--max-model-len", type=int_between(1, MAX_MODEL_LEN), default=32768,
                   help=f"at most the model's {MAX_MODEL_LEN:,} positions (default: %(default)s)")
    p.add_argument("--gpu-memory-utilization", type=fraction, default=0.9,
                   help="share of GPU memory vLLM may take, in (0, 1] (default: %(default)s)")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    p.add_argument("--workdir", help="where to write the model config.json (default: a temp dir)")
    p.add_argument("--seed", type=int_between(0, MAX_SEED), default=0, help="(default: %(default)s)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    for path, flag, directory in ((args.output, "-o/--output", False), (args.workdir, "--workdir", True)):
        problem = None if path is None else path_problem(path, flag, directory)
        if problem:
            print(f"python -m engine profile: error: {problem}", file=sys.stderr)
            return 2
    if args.max_num_batched_tokens < args.max_num_seqs:  # vLLM's SchedulerConfig refuses it, after the GPU check
        print(f"python -m engine profile: error: --max-num-batched-tokens ({args.max_num_batched_tokens}) must be "
              f">= --max-num-seqs ({args.max_num_seqs}), as vLLM requires", file=sys.stderr)
        return 2
    problem = gpu_problem()
    if problem:
        print(f"python -m engine profile: {problem}", file=sys.stderr)
        return 1
    profile = profile_on_gpu(args)
    if not profile.rows:
        print("python -m engine profile: no step ran as planned; nothing written", file=sys.stderr)
        return 1
    write_profile(args.output, profile)
    print(f"wrote {len(profile.rows)} steps to {args.output}")
    return 0
