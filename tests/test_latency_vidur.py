"""Vidur importer: per-operator sums checked against hand arithmetic on real rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from sim.hardware import load_gpu, load_model
from sim.latency.base import StepShape
from sim.latency.profile import read_profile
from sim.latency.vidur import Arch, SyntheticStep, VidurError, build_profile, main, read_vidur_mlp, shape_grid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vidur-profiles"
A100 = DATA / "a100-llama-3-8b" / "mlp.csv"
H100 = DATA / "h100-llama-2-7b" / "mlp.csv"
L31 = load_model("llama-3.1-8b")


def step_ms(ops, n):
    return ops.step_ms(ops.tokens.index(n), 32)


def test_a100_rows_by_hand():
    ops = read_vidur_mlp(A100)
    assert ops.arch == Arch.of(L31)  # Llama-3-8B has Llama-3.1-8B's shapes
    # Line 457 (num_tokens=1, TP=1), median column of each op; add counted twice; emb once.
    layer1 = 0.005 + 0.033 + 0.004 + 0.025 + 0.005 + 0.142 + 0.011 + 0.076 + 2 * 0.002
    assert step_ms(ops, 1) == pytest.approx(32 * layer1 + 0.003)
    # Line 391 (num_tokens=512).
    layer512 = 0.012 + 0.13 + 0.012 + 0.085 + 0.012 + 0.516 + 0.046 + 0.263 + 2 * 0.0065
    assert step_ms(ops, 512) == pytest.approx(32 * layer512 + 0.027)
    # Lines 262 and 263 both have num_tokens=2048: they are averaged.
    row262 = 0.0545 + 0.467 + 0.048 + 0.308 + 0.056 + 2.2485 + 0.174 + 1.049 + 2 * 0.026
    row263 = 0.056 + 0.479 + 0.049 + 0.318 + 0.057 + 2.309 + 0.177 + 1.077 + 2 * 0.027
    assert step_ms(ops, 2048) == pytest.approx(32 * (row262 + row263) / 2 + (0.121 + 0.124) / 2)


def test_h100_llama2_row_and_scaling_by_hand():
    ops = read_vidur_mlp(H100)
    assert (ops.arch.n_kv_head, ops.arch.n_expanded_embd, ops.arch.vocab_size) == (32, 11008, 32768)  # MHA
    # Line 228 (num_tokens=256, TP=1): emb .009, ln .004, qkv .052, rope .007, o .022, ln .004,
    # up .13, act .008, down .056, add .003.
    raw_layer = 0.004 + 0.052 + 0.007 + 0.022 + 0.004 + 0.13 + 0.008 + 0.056 + 2 * 0.003
    assert step_ms(ops, 256) == pytest.approx(32 * raw_layer + 0.009)
    # To Llama-3.1-8B: QKV x (32 + 2*8) / (3*32) = 0.5, rope x 40/64, MLP ops x 14336/11008.
    mlp = 14336 / 11008
    est_layer = 0.004 + 0.052 * 0.5 + 0.007 * 40 / 64 + 0.022 + 0.004 + (0.13 + 0.008 + 0.056) * mlp + 2 * 0.003
    assert step_ms(ops.scaled_to(Arch.of(L31)), 256) == pytest.approx(32 * est_layer + 0.009)


def test_interpolation_and_extrapolation():
    ops = read_vidur_mlp(A100)
    step = SyntheticStep.build(ops, L31, load_gpu("a100-80gb"))
    lo, hi = step_ms(ops, 512) / 1e3, step_ms(ops, 520) / 1e3
    assert step.forward_seconds(516) == pytest.approx((lo + hi) / 2)
    top = ops.tokens[-1]
    assert step.forward_seconds(2 * top) == pytest.approx(2 * step.forward_seconds(top))


def test_profile_shapes_are_valid_and_times_grow(tmp_path):
    out = tmp_path / "p.csv"
    assert main([str(A100), "--model", "llama-3.1-8b", "--gpu", "a100-80gb", "-o", str(out)]) == 0
    prof = read_profile(out)  # the reader validates every row
    assert len(prof.rows) > 150 and prof.provenance["gpu"] == "a100-80gb"
    assert prof.host() == {"host_per_step": 0.002, "host_per_seq": 1e-05}  # the assumed CPU overhead
    assert all(r.shape.num_tokens <= 8192 and r.shape.num_seqs <= 256 for r in prof.rows)
    kinds = {(r.shape.num_decode > 0, r.shape.prefill_tokens > 0) for r in prof.rows}
    assert kinds == {(True, False), (False, True), (True, True)}  # decode, prefill, mixed
    t = {r.shape: r.seconds for r in prof.rows}
    d = [t[StepShape.from_batch([(1, c)] * b)] for b, c in ((1, 1024), (64, 1024), (64, 4096))]
    assert d[0] < d[1] < d[2]


def test_estimate_is_marked(tmp_path):
    prof = build_profile(H100, L31, load_gpu("h100"))
    assert prof.provenance["derived"].count("ESTIMATE") == 1


def test_grid_respects_limits():
    for s in shape_grid(max_tokens=2048, max_seqs=64):
        assert s.num_tokens <= 2048 and s.num_seqs <= 64


def test_errors(tmp_path, capsys):
    bad = tmp_path / "mlp.csv"
    bad.write_text("num_tokens,num_tensor_parallel_workers\n1,1\n")
    ops = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
           "mlp_up_proj", "mlp_act", "mlp_down_proj", "add", "emb")
    missing = ", ".join([f"time_stats.{op}.median" for op in ops]
                        + ["n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size", "use_gated_mlp"])
    message = f"{bad}: not a Vidur mlp.csv: missing column(s) {missing}"
    with pytest.raises(VidurError) as err:
        read_vidur_mlp(bad)
    assert str(err.value) == message
    assert main([str(bad), "-o", str(tmp_path / "o.csv")]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(VidurError) as err:
        read_vidur_mlp(A100, tp=3)
    assert str(err.value) == f"{A100}: no rows with num_tensor_parallel_workers == 3; the file has 1, 2, 4, 8"


def test_grid_at_small_and_odd_budgets_is_valid_and_unique():
    """At 224 tokens or below the mixed steps had a chunk of <= 0 tokens (a ValueError traceback); at 2052 the
    budget's remainder 2048 repeated a listed size, six duplicate rows."""
    from sim.latency.vidur import MIN_GRID_TOKENS

    for budget in (MIN_GRID_TOKENS, 300, 2052, 8192):
        shapes = shape_grid(max_tokens=budget)
        assert len(set(shapes)) == len(shapes), budget
        assert all(s.num_tokens <= budget for s in shapes)


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "100"], "argument --max-tokens: expected an integer from 256 to 1,000,000, got 100"),
    # TP rows are one shard's timings, but attention and the LM head were added for a whole model on one GPU
    (["--tp", "2"], "argument --tp: invalid choice: 2 (choose from 1)"),
])
def test_options_that_would_build_a_wrong_profile_are_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main([str(A100), "-o", str(tmp_path / "o.csv"), *args])
    assert info.value.code == 2 and capsys.readouterr().err.endswith(f"error: {message}\n")


@pytest.mark.parametrize("value", ["-0.5", "nan", "inf"])
def test_a_timing_that_is_not_a_time_is_refused_at_its_line(tmp_path, value):
    """-0.5 ms wrote a profile 46% faster at that size, and NaN one that ended in ",nan"; both exited 0."""
    lines = A100.read_text().splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    col, tp_col = (header.index(c) for c in ("time_stats.mlp_act.median", "num_tensor_parallel_workers"))
    row = next(i for i, line in enumerate(lines[1:], start=1) if line.split(",")[tp_col].strip() == "1")
    cells = lines[row].rstrip("\n").split(",")
    cells[col] = value
    lines[row] = ",".join(cells) + "\n"
    bad = tmp_path / "mlp.csv"
    bad.write_text("".join(lines))
    with pytest.raises(VidurError) as err:
        read_vidur_mlp(bad)
    assert str(err.value) == (f"{bad}:{row + 1}: column time_stats.mlp_act.median: expected a time in ms that is "
                              f"finite and >= 0, got {value!r}")


def test_a_file_that_is_not_utf8_text_is_a_vidur_error(tmp_path, capsys):
    bad = tmp_path / "mlp.csv"
    bad.write_bytes("num_tokens\n".encode("utf-16"))
    assert main([str(bad), "-o", str(tmp_path / "o.csv")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {bad}: not UTF-8 text (")


@pytest.mark.parametrize("src, gpu, name", [(A100, "a100-80gb", "a100-llama-3.1-8b"),
                                            (H100, "h100", "h100-llama-3.1-8b-est")])
def test_the_readmes_commands_rebuild_the_shipped_models_byte_for_byte(tmp_path, src, gpu, name):
    """Both files stamped the day they were made, so a rebuild never matched what we ship
    (nor a rebuild on another day, or in another time zone): now they name their inputs by digest."""
    import subprocess
    import sys

    models = Path(__file__).resolve().parents[1] / "sim" / "latency" / "models"
    profile, model = tmp_path / f"{name}.profile.csv", tmp_path / f"{name}.json"
    for cmd in (["sim.latency.vidur", str(src), "--model", "llama-3.1-8b", "--gpu", gpu, "-o", str(profile)],
                ["sim", "fit-latency", str(profile), "-o", str(model)]):
        res = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, env={
            **__import__("os").environ, "TZ": "Pacific/Kiritimati"})
        assert res.returncode == 0, res.stderr
    assert profile.read_bytes() == (models / profile.name).read_bytes()
    assert model.read_bytes() == (models / model.name).read_bytes()
