"""Turn Vidur's per-operator profiles into a step-time profile in our format.

Why: we have no GPU to profile vLLM on, but Vidur (MIT licence) publishes
CUDA-event timings of every non-attention operator of one transformer layer,
per number of tokens, for Llama-3-8B on A100 and Llama-2-7B on H100
(``../shared/data/vidur-profiles/*/mlp.csv``). Summing them gives the
non-attention GPU time of a whole forward pass at any token count; adding an
attention term and a per-step CPU overhead gives a whole step, which we
evaluate on a grid of batch shapes and write as a profile CSV that
``python -m sim fit-latency`` fits like a measured one.

How a step's time is built (all choices are constants below):

* **Per-layer operators.** ``input_layernorm + attn_pre_proj (QKV) +
  attn_rope + attn_post_proj (O) + post_attention_layernorm + mlp_up_proj
  (gate+up) + mlp_act + mlp_down_proj + 2 x add``, times ``num_layers``. A
  Llama decoder layer has two residual adds (after attention and after the
  MLP). The ``add`` column is the time of one residual add (an element-wise
  add of ``num_tokens x hidden``); Vidur's own simulator adds it once per
  block, and vLLM fuses each add into the following RMSNorm
  (``fused_add_rms_norm``). We count it twice, as the unfused layer runs it;
  either choice changes a layer by under 1% (0.47 ms of 68 ms per layer at
  32k tokens on A100, 0.002 of 0.305 ms at 1 token).
* **Embedding** (``emb``) once per step; its timing does not depend on layers.
* **Statistic.** The ``median`` of Vidur's repeated timings, robust to the
  occasional slow repetition (``mean`` is selectable). Rows repeated for the
  same ``num_tokens`` (Vidur re-profiles some counts) are averaged.
* **Tensor parallel.** Only the ``num_tensor_parallel_workers == 1`` rows are
  used (``--tp`` selects others); we ship single-GPU models.
* **Token counts between measurements** are linearly interpolated; above the
  largest measured count the time is extrapolated proportionally to the
  tokens (the GEMMs are compute-bound there, so linear in tokens).
* **LM head** (not in Vidur's ``mlp.csv``): roofline, logits for one position
  per sequence, ``max(2 h V seqs / F, h V bytes / B)``.
* **Attention** (not included in the published profiles): roofline, prefill
  FLOPs ``4 L H d pairs / (peak x ATTN_PREFILL_EFFICIENCY)`` and the KV cache
  read by every decode and every prefill chunk (its context and itself) ``KV
  bytes / (bandwidth x ATTN_KV_READ_EFFICIENCY)``.
* **Per-step overhead**: ``STEP_OVERHEAD_S`` (2 ms) plus
  ``PER_SEQ_OVERHEAD_S`` (10 us) per sequence: vLLM v1's scheduling, input
  preparation, sampling and output processing run on the CPU between GPU
  forward passes and are not in any operator timing. The values are our
  assumption (a few ms per step is the usual order for an 8B model without
  async scheduling), not a measurement; they enter the fitted ``per_step`` and
  ``per_seq`` almost one to one. The profile also names them as its host
  time (``host_per_step``, ``host_per_seq``), which the fitted model keeps so
  that async scheduling can hide them behind the GPU. Our own profiler (``python -m engine
  profile``) measures the real overhead and should replace them.

Estimating a model Vidur did not profile (``h100-llama-3.1-8b-est``): the
H100 data is Llama-2-7B (MHA: 32 KV heads, MLP width 11008, vocab 32000);
Llama-3.1-8B has 8 KV heads and MLP width 14336. Each operator's time is
scaled, at every token count, by the ratio of its work between the two
shapes (:func:`op_work`): for a GEMM ``n x k @ k x m`` both FLOPs (``2nkm``)
and weight bytes (``2km``) scale with ``k m``, so one ratio holds in both the
compute- and memory-bound regimes (activation traffic is ignored); element-
wise ops scale with their width. E.g. QKV: ``(4096 + 2 x 8 x 128) / (3 x
4096) = 0.5``; gate+up and down: ``14336 / 11008 = 1.30``; rope: ``(32 + 8) /
(32 + 32) = 0.625``; O projection, norms, adds, embedding: 1. It assumes
each kernel reaches the same efficiency at the new shape, which is why the
shipped model is marked ``-est``. Vidur's H100 data stops at 4096 tokens, so
steps of up to 8192 tokens use the proportional extrapolation above.

Command: ``python -m sim.latency.vidur SRC/mlp.csv --model llama-3.1-8b
--gpu a100-80gb -o PROFILE.csv``, then ``python -m sim fit-latency
PROFILE.csv -o MODEL.json``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from traces.argtypes import StrictParser, int_between

from sim.hardware import GPUSpec, ModelSpec, SpecError, load_gpu, load_model
from sim.latency.base import StepShape
from sim.latency.profile import Profile, ProfileRow, write_profile

# Operators of one decoder layer and how often each runs per layer.
LAYER_OPS = {
    "input_layernorm": 1,
    "attn_pre_proj": 1,
    "attn_rope": 1,
    "attn_post_proj": 1,
    "post_attention_layernorm": 1,
    "mlp_up_proj": 1,
    "mlp_act": 1,
    "mlp_down_proj": 1,
    "add": 2,
}
STEP_OPS = {"emb": 1}
STATS = ("median", "mean", "min", "max")
ARCH_COLUMNS = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp")

ATTN_PREFILL_EFFICIENCY = 0.5  # FlashAttention-2 forward reaches ~50-70% of peak at head_dim 128
ATTN_KV_READ_EFFICIENCY = 0.7  # paged attention reading the KV cache reaches ~60-80% of HBM bandwidth
LM_HEAD_FLOPS_EFFICIENCY = 0.6
LM_HEAD_BANDWIDTH_EFFICIENCY = 0.7
STEP_OVERHEAD_S = 2e-3
PER_SEQ_OVERHEAD_S = 10e-6
KV_TOKEN_LIMIT = 400_000  # grid steps stay within an 80 GB GPU's KV cache for an 8B model


class VidurError(ValueError):
    """A Vidur profile that is missing, malformed or lacks what we need."""


@dataclass(frozen=True)
class Arch:
    """The shape of a Llama-style model, as Vidur's columns describe it."""

    n_head: int
    n_kv_head: int
    n_embd: int
    n_expanded_embd: int
    vocab_size: int
    gated: bool = True

    @staticmethod
    def of(model: ModelSpec) -> "Arch":
        return Arch(model.num_heads, model.num_kv_heads, model.hidden_size,
                    model.intermediate_size, model.vocab_size, True)


def op_work(op: str, a: Arch) -> float:
    """Work of one operator per token, up to a constant factor shared by all archs."""
    hd = a.n_embd / a.n_head
    return {
        "attn_pre_proj": a.n_embd * (a.n_head + 2 * a.n_kv_head) * hd,
        "attn_post_proj": a.n_head * hd * a.n_embd,
        "mlp_up_proj": a.n_embd * a.n_expanded_embd * (2 if a.gated else 1),
        "mlp_down_proj": a.n_expanded_embd * a.n_embd,
        "mlp_act": a.n_expanded_embd,
        "attn_rope": (a.n_head + a.n_kv_head) * hd,
        "input_layernorm": a.n_embd,
        "post_attention_layernorm": a.n_embd,
        "add": a.n_embd,
        "emb": a.n_embd,
    }[op]


@dataclass(frozen=True)
class VidurOps:
    """Per-operator timings (ms) at each measured token count, for one TP degree."""

    source: str
    arch: Arch
    tp: int
    stat: str
    tokens: tuple[int, ...]
    ops_ms: dict[str, tuple[float, ...]]

    def layer_ms(self, i: int) -> float:
        return sum(k * self.ops_ms[op][i] for op, k in LAYER_OPS.items())

    def step_ms(self, i: int, num_layers: int) -> float:
        """Non-attention forward time at ``tokens[i]``: layers x per-layer sum + embedding."""
        return num_layers * self.layer_ms(i) + sum(k * self.ops_ms[op][i] for op, k in STEP_OPS.items())

    def scaled_to(self, target: Arch) -> "VidurOps":
        """Estimate the same operators at another Llama-style shape (module docstring)."""
        ops = {op: tuple(v * op_work(op, target) / op_work(op, self.arch) for v in vals)
               for op, vals in self.ops_ms.items()}
        return VidurOps(self.source, target, self.tp, self.stat, self.tokens, ops)


def read_vidur_mlp(path: str | Path, tp: int = 1, stat: str = "median") -> VidurOps:
    """Read Vidur's ``mlp.csv``; averages rows repeated for one ``num_tokens``."""
    if stat not in STATS:
        raise VidurError(f"stat must be one of {', '.join(STATS)}, got {stat!r}")
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            need = [f"time_stats.{op}.{stat}" for op in (*LAYER_OPS, *STEP_OPS)]
            need += ["num_tokens", "num_tensor_parallel_workers", *ARCH_COLUMNS]
            missing = [c for c in need if c not in header]
            if missing:
                raise VidurError(f"{path}: not a Vidur mlp.csv: missing column(s) {', '.join(missing)}")
            acc: dict[int, list[dict[str, float]]] = {}
            arch = None
            tps: set[int] = set()
            for lineno, rec in enumerate(reader, start=2):
                try:
                    this_tp = int(rec["num_tensor_parallel_workers"])
                    tps.add(this_tp)
                    if this_tp != tp:
                        continue
                    n = int(rec["num_tokens"])
                    row = {op: float(rec[f"time_stats.{op}.{stat}"]) for op in (*LAYER_OPS, *STEP_OPS)}
                    this = Arch(int(rec["n_head"]), int(rec["n_kv_head"]), int(rec["n_embd"]),
                                int(rec["n_expanded_embd"]), int(rec["vocab_size"]),
                                rec["use_gated_mlp"].strip().lower() == "true")
                except (TypeError, ValueError) as exc:
                    raise VidurError(f"{path}:{lineno}: malformed row: {exc}") from None
                # A NaN, negative or infinite timing wrote a profile of nonsense (or NaN) and exited 0.
                bad = next((op for op, v in row.items() if not (math.isfinite(v) and v >= 0)), None)
                if bad is not None:
                    raise VidurError(f"{path}:{lineno}: column time_stats.{bad}.{stat}: expected a time in ms "
                                     f"that is finite and >= 0, got {rec[f'time_stats.{bad}.{stat}']!r}")
                if arch is not None and this != arch:
                    raise VidurError(f"{path}:{lineno}: model columns differ from earlier rows ({this} vs {arch})")
                arch = this
                acc.setdefault(n, []).append(row)
    except FileNotFoundError:
        raise VidurError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise VidurError(f"{path}: not UTF-8 text ({exc.reason}); expected Vidur's mlp.csv") from None
    except csv.Error as exc:  # a field past the csv module's size limit, a NUL
        raise VidurError(f"{path}: not a readable CSV file: {exc}") from None
    if not acc:
        present = ", ".join(map(str, sorted(tps))) or "none"
        raise VidurError(f"{path}: no rows with num_tensor_parallel_workers == {tp}; the file has {present}")
    tokens = tuple(sorted(acc))
    ops = {op: tuple(sum(r[op] for r in acc[n]) / len(acc[n]) for n in tokens) for op in (*LAYER_OPS, *STEP_OPS)}
    return VidurOps(str(path), arch, tp, stat, tokens, ops)


@dataclass(frozen=True)
class SyntheticStep:
    """Whole-step time from operator sums plus roofline attention, LM head and overhead."""

    tokens: np.ndarray  # measured token counts, ascending
    forward_s: np.ndarray  # non-attention forward seconds at each
    seconds_per_attn_pair: float
    seconds_per_kv_read_token: float
    lm_head_flop_s_per_seq: float
    lm_head_read_s: float
    step_overhead_s: float = STEP_OVERHEAD_S
    per_seq_overhead_s: float = PER_SEQ_OVERHEAD_S

    @classmethod
    def build(cls, ops: VidurOps, model: ModelSpec, gpu: GPUSpec) -> "SyntheticStep":
        fwd = np.array([ops.step_ms(i, model.num_layers) / 1e3 for i in range(len(ops.tokens))])
        lm_bytes = model.hidden_size * model.vocab_size * model.dtype_bytes
        return cls(
            tokens=np.array(ops.tokens, dtype=float),
            forward_s=fwd,
            seconds_per_attn_pair=4 * model.num_layers * model.num_heads * model.head_dim
            / (gpu.peak_flops * ATTN_PREFILL_EFFICIENCY),
            seconds_per_kv_read_token=model.kv_bytes_per_token / (gpu.hbm_bandwidth * ATTN_KV_READ_EFFICIENCY),
            lm_head_flop_s_per_seq=2 * model.hidden_size * model.vocab_size
            / (gpu.peak_flops * LM_HEAD_FLOPS_EFFICIENCY),
            lm_head_read_s=lm_bytes / (gpu.hbm_bandwidth * LM_HEAD_BANDWIDTH_EFFICIENCY),
        )

    def forward_seconds(self, n: int) -> float:
        top = self.tokens[-1]
        if n > top:
            return float(self.forward_s[-1] * n / top)
        return float(np.interp(n, self.tokens, self.forward_s))

    def seconds(self, s: StepShape) -> float:
        lm_head = max(self.lm_head_flop_s_per_seq * s.num_seqs, self.lm_head_read_s)
        return (self.forward_seconds(s.num_tokens) + lm_head
                + self.seconds_per_attn_pair * s.prefill_attn_pairs
                + self.seconds_per_kv_read_token * s.kv_read_tokens
                + self.step_overhead_s + self.per_seq_overhead_s * s.num_seqs)


# The smallest token budget a grid is built for: the mixed steps below put up
# to 224 decodes beside one prefill chunk of at least two tokens.
MIN_GRID_TOKENS = 256


def shape_grid(max_tokens: int = 8192, max_seqs: int = 256, kv_limit: int = KV_TOKEN_LIMIT) -> list[StepShape]:
    """Batch shapes a vLLM engine with these limits actually runs.

    Pure prefill (one chunk at several sizes and cached contexts, and several
    equal chunks), pure decode (batch size x context) and mixed steps
    (decodes plus one prefill chunk filling part of the token budget).
    """
    shapes: list[list[tuple[int, int]]] = []
    chunks = [16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
    for new in chunks:
        for ctx in (0, 1024, 4096, 16384):
            if new <= max_tokens and new + ctx <= kv_limit:
                shapes.append([(new, ctx)])
    for k in (2, 4, 8, 16):
        for new in (64, 256, 512, 1024, 2048):
            if k * new <= max_tokens and k <= max_seqs:
                shapes.append([(new, 0)] * k)
    for b in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256):
        for ctx in (32, 128, 512, 1024, 2048, 4096, 8192, 16384):
            if b <= max_seqs and b * (ctx + 1) <= kv_limit:
                shapes.append([(1, ctx)] * b)
    for b in (4, 16, 64, 128, 224):
        for ctx in (256, 1024, 4096):
            # The budget's remainder may equal a listed size (2052 - 4 = 2048): each size once.
            for new in dict.fromkeys((128, 512, 2048, max_tokens - b)):
                for pctx in (0, 2048):
                    # new >= 2: a one-token "chunk" is a decode, and below it no chunk at all
                    if new >= 2 and b + 1 <= max_seqs and b + new <= max_tokens and b * (ctx + 1) + new + pctx <= kv_limit:
                        shapes.append([(1, ctx)] * b + [(new, pctx)])
    return [StepShape.from_batch(batch) for batch in shapes]


def build_profile(src: str | Path, model: ModelSpec, gpu: GPUSpec, tp: int = 1, stat: str = "median",
                  max_tokens: int = 8192) -> Profile:
    ops = read_vidur_mlp(src, tp, stat)
    target = Arch.of(model)
    note = "operator shapes match the target model"
    if ops.arch != target:
        a = ops.arch
        note = (f"ESTIMATE: operators profiled at n_head={a.n_head} n_kv_head={a.n_kv_head} n_embd={a.n_embd} "
                f"n_expanded_embd={a.n_expanded_embd} vocab={a.vocab_size}, scaled per operator by its work "
                f"ratio to the {model.name} shapes; steps above {ops.tokens[-1]} tokens extrapolated linearly")
        ops = ops.scaled_to(target)
    step = SyntheticStep.build(ops, model, gpu)
    rows = [ProfileRow(s, step.seconds(s)) for s in shape_grid(max_tokens)]
    provenance = {
        "gpu": gpu.name,
        "model": model.name,
        "engine": "none (Vidur operator profiles; vLLM-like step composition)",
        "source": f"microsoft/vidur mlp.csv ({Path(src).parent.name}/{Path(src).name}), MIT licence",
        # The file's digest, not the day it was turned into steps: rebuilt by the README's
        # commands, the shipped profiles and models come out byte for byte.
        "source_sha256": hashlib.sha256(Path(src).read_bytes()).hexdigest(),
        "derived": (f"sim.latency.vidur: TP={tp} {stat} per-op ms, layer sum x{model.num_layers} + emb, linear "
                    f"interpolation in num_tokens; roofline attention (prefill eff {ATTN_PREFILL_EFFICIENCY}, "
                    f"KV read eff {ATTN_KV_READ_EFFICIENCY}, decodes' and prefill chunks') and LM head; "
                    f"overhead {STEP_OVERHEAD_S * 1e3:g} ms/step "
                    f"+ {PER_SEQ_OVERHEAD_S * 1e6:g} us/seq; {note}"),
        # The overhead is the step's CPU work: the fitted model keeps it as
        # host time, which async scheduling overlaps with the GPU.
        "host_per_step": repr(STEP_OVERHEAD_S),
        "host_per_seq": repr(PER_SEQ_OVERHEAD_S),
    }
    return Profile(rows, provenance)


def main(argv: list[str] | None = None) -> int:
    p = StrictParser(
        prog="python -m sim.latency.vidur",
        description="Build a step-time profile CSV from a Vidur per-operator mlp.csv.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  python -m sim.latency.vidur ../shared/data/vidur-profiles/a100-llama-3-8b/mlp.csv \\\n"
            "      --model llama-3.1-8b --gpu a100-80gb -o a100.csv\n"
            "  python -m sim fit-latency a100.csv -o a100-llama-3.1-8b.json --name a100-llama-3.1-8b"
        ),
    )
    p.add_argument("src", help="Vidur mlp.csv")
    p.add_argument("--model", default="llama-3.1-8b", help="model spec name or .json path (default: %(default)s)")
    p.add_argument("--gpu", default="a100-80gb", help="GPU spec name or .json path (default: %(default)s)")
    # Only one GPU: Vidur's TP=N rows are one shard's timings, and this builder
    # adds attention, the LM head and no all-reduce for a whole model on one GPU.
    p.add_argument("--tp", type=int, choices=(1,), default=1,
                   help="tensor-parallel rows to use: 1 only, a multi-GPU step also needs its attention split and "
                        "an all-reduce (default: %(default)s)")
    p.add_argument("--stat", choices=STATS, default="median", help="timing statistic (default: %(default)s)")
    p.add_argument("--max-tokens", type=int_between(MIN_GRID_TOKENS, 10**6), default=8192,
                   help=f"token budget of the grid, at least {MIN_GRID_TOKENS} (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="profile CSV to write")
    args = p.parse_args(argv)
    try:
        profile = build_profile(args.src, load_model(args.model), load_gpu(args.gpu), args.tp, args.stat,
                                args.max_tokens)
        write_profile(args.output, profile)
    except (VidurError, SpecError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(profile.rows)} steps to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
