"""Fitted latency: coefficient recovery, shipped models' quality, loading and the CLI."""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from sim.config import LatencyConfig
from sim.hardware import load_gpu, load_model
from sim.latency import build
from sim.latency.base import StepShape
from sim.latency.fitted import (COEFFICIENTS, MODELS_DIR, FitError, FittedLatency, available, fit_latency_main,
                                fit_profile, load_fitted, quality, split)
from sim.latency.profile import Profile, ProfileRow, read_profile, write_profile

TRUE = FittedLatency(per_token=5e-5, weights_floor=0.009, per_attn_pair=3e-9, per_kv_read_token=9e-8,
                     per_seq=7e-6, per_step=0.003, name="truth")
SHIPPED = ("a100-llama-3.1-8b", "h100-llama-3.1-8b-est")


def synthetic_rows(model: FittedLatency, n: int = 300, seed: int = 1, noise: float = 0.0) -> list[ProfileRow]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        kind = rng.random()
        batch = []
        if kind < 0.4:
            batch += [(1, rng.randint(0, 8000)) for _ in range(rng.randint(1, 256))]
        if kind > 0.3:
            batch += [(rng.randint(2, 4096), rng.randint(0, 8000)) for _ in range(rng.randint(1, 3))]
        shape = StepShape.from_batch(batch)
        t = model.step_time(shape) * (1 + rng.uniform(-noise, noise))
        rows.append(ProfileRow(shape, t))
    return rows


def test_recovers_known_coefficients():
    model, report = fit_profile(synthetic_rows(TRUE), name="x")
    for key in COEFFICIENTS:
        assert getattr(model, key) == pytest.approx(getattr(TRUE, key), rel=1e-4), key
    assert report["heldout"]["mape_pct"] < 1e-3
    assert report["heldout"]["r2"] > 0.999999


def test_recovers_linear_model_without_floor():
    lin = FittedLatency(4e-5, 0.0, 2e-9, 1e-7, 0.0, 0.005)
    model, _ = fit_profile(synthetic_rows(lin, seed=3))
    assert model.per_token == pytest.approx(4e-5, rel=1e-4)
    assert model.per_step == pytest.approx(0.005, rel=1e-4)
    assert model.step_time(StepShape.from_batch([(1, 0)])) == pytest.approx(lin.step_time(StepShape.from_batch([(1, 0)])), rel=1e-4)


def test_noisy_fit_is_close_and_reports_error():
    model, report = fit_profile(synthetic_rows(TRUE, noise=0.05, seed=2))
    assert 1.0 < report["heldout"]["mape_pct"] < 4.0
    assert model.per_token == pytest.approx(TRUE.per_token, rel=0.05)


def test_split_is_deterministic_and_disjoint():
    rows = synthetic_rows(TRUE, n=50)
    a_train, a_test = split(rows, 0.2, seed=7)
    b_train, b_test = split(rows, 0.2, seed=7)
    assert a_test == b_test and len(a_test) == 10 and len(a_train) == 40
    assert split(rows, 0.2, seed=8)[1] != a_test


def test_too_few_rows():
    with pytest.raises(FitError, match=r"^profile has 5 steps; fitting 6 coefficients on 12 or more and testing on "
                                        r"2 or more, with a held-out share of 0.2, needs at least 15$"):
        fit_profile(synthetic_rows(TRUE, n=5))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_models_meet_quality_bar(name):
    model = load_fitted(name)
    fit = model.fit
    assert fit["heldout"]["mape_pct"] <= 5.0
    assert fit["heldout"]["r2"] >= 0.99
    for key in ("gpu", "model", "engine", "source", "source_sha256", "derived", "profile_sha256"):
        assert model.provenance[key], key
    # The stored figures are true of the stored coefficients on the shipped profile's held-out split.
    rows = read_profile(MODELS_DIR / f"{name}.profile.csv").rows
    _, test = split(rows, fit["test_fraction"], fit["seed"])
    q = quality(model, test)
    assert q["mape_pct"] == pytest.approx(fit["heldout"]["mape_pct"], rel=1e-9)
    assert q["mape_pct"] <= 5.0


def test_shipped_model_is_refit_from_its_profile():
    name = SHIPPED[0]
    shipped = load_fitted(name)
    refit, _ = fit_profile(read_profile(MODELS_DIR / f"{name}.profile.csv").rows, name)
    for key in COEFFICIENTS:
        assert getattr(refit, key) == pytest.approx(getattr(shipped, key), rel=1e-6, abs=1e-15), key


def test_step_time_matches_formula_and_is_zero_when_empty():
    s = StepShape.from_batch([(1, 999)] * 64 + [(512, 100)])
    # KV read: 64 decodes of 1,000 each and the chunk's 100 + 512
    expect = max(5e-5 * 576, 0.009) + 3e-9 * s.prefill_attn_pairs + 9e-8 * (64000 + 612) + 7e-6 * 65 + 0.003
    assert TRUE.step_time(s) == pytest.approx(expect)
    assert TRUE.step_time(StepShape()) == 0.0


def test_a_v1_model_is_refused_with_what_changed(tmp_path):
    """v1 charged decodes only for reading the KV cache; read as v2 its coefficient would mean another thing."""
    old = tmp_path / "old.json"
    coefficients = {k: v for k, v in TRUE.coefficients().items() if k != "per_kv_read_token"}
    old.write_text(json.dumps({"format": "autellix-fitted-latency v1",
                               "coefficients": {**coefficients, "per_decode_kv_token": 9e-8}}))
    with pytest.raises(FitError) as err:
        load_fitted(str(old))
    assert str(err.value) == (
        f'{old}: "format": "autellix-fitted-latency v1" is an older form (per_decode_kv_token charged decodes only '
        "for reading the KV cache; v2's per_kv_read_token charges prefill chunks' reads of their context too); "
        "profile the engine again (python -m engine profile, whose profile has the prefill_kv_tokens column) and "
        "fit that (python -m sim fit-latency)")


def test_load_by_path_and_errors(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(TRUE.to_json()))
    assert load_fitted(str(path)) == TRUE
    shipped = "a100-llama-3.1-8b, h100-llama-3.1-8b-est"
    with pytest.raises(ValueError) as err:
        load_fitted("no-such-model")
    assert str(err.value) == (f"latency.name: unknown fitted model 'no-such-model'; valid choices: {shipped} "
                              "(or a path to a .json file)")
    with pytest.raises(ValueError) as err:
        load_fitted(None)
    assert str(err.value) == f"latency.name: the fitted kind needs a model name or .json path, got None; shipped: {shipped}"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TRUE.to_json(), "coefficients": {"per_token": 1}}))
    with pytest.raises(FitError) as err:
        load_fitted(str(bad))
    assert str(err.value) == (f'{bad}: "coefficients" must have exactly per_token, weights_floor, per_attn_pair, '
                              "per_kv_read_token, per_seq, per_step; got ['per_token']")
    neg = tmp_path / "neg.json"
    neg.write_text(json.dumps({**TRUE.to_json(), "coefficients": {**TRUE.coefficients(), "per_step": -1}}))
    with pytest.raises(FitError) as err:
        load_fitted(str(neg))
    assert str(err.value) == f"{neg}: fitted latency 'truth': coefficient per_step must be a finite number >= 0, got -1"
    huge = tmp_path / "huge.json"  # past Python's 4300-digit limit for reading an integer
    huge.write_text(json.dumps({**TRUE.to_json(), "coefficients": {**TRUE.coefficients(), "per_step": -1}})
                    .replace('"per_step": -1', '"per_step": ' + "9" * 5000))
    with pytest.raises(FitError) as err:
        load_fitted(str(huge))
    assert str(err.value) == (f"{huge}: fitted latency 'truth': coefficient per_step must be a finite number >= 0, "
                              "got a 5000-digit integer")
    # Tracebacks or silence before: 400 digits (OverflowError), a key given twice (the last won), deep nesting.
    big = tmp_path / "big.json"
    big.write_text(json.dumps({**TRUE.to_json(), "host": {"per_step": 1}}).replace('"per_step": 1}', '"per_step": 1'
                                                                                     + "0" * 400 + "}"))
    with pytest.raises(FitError) as err:
        load_fitted(str(big))
    assert str(err.value) == (f"{big}: fitted latency 'truth': host per_step must be a finite number >= 0, "
                              "got an integer of 401 digits")
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps(TRUE.to_json(), indent=1).replace('"per_step": ', '"per_step": 0.5, "per_step": ', 1))
    second = next(i for i, text in enumerate(twice.read_text().splitlines(), 1) if text.count('"per_step"') == 2)
    with pytest.raises(FitError, match=rf"^{re.escape(str(twice))}:{second}: field 'per_step': duplicate key$"):
        load_fitted(str(twice))
    twice.write_text(json.dumps(TRUE.to_json(), indent=1).replace('"per_step": ', '"per_step": 0.5,\n"per_step": ', 1))
    second = next(i for i, text in enumerate(twice.read_text().splitlines(), 1) if text.strip() == '"per_step": 0.5,') + 1
    with pytest.raises(FitError, match=rf"^{re.escape(str(twice))}:{second}: field 'per_step': duplicate key$"):
        load_fitted(str(twice))  # on the duplicate's line, not the first's
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(FitError, match=r"deep.json: malformed JSON: nested too deeply for a fitted model$"):
        load_fitted(str(deep))


def test_host_time_is_carried_from_the_profile_and_capped_by_the_step(tmp_path):
    prof = tmp_path / "p.csv"
    write_profile(prof, Profile(synthetic_rows(TRUE), {"gpu": "g", "model": "m", "host_per_step": "0.002",
                                                        "host_per_seq": "1e-05"}))
    out = tmp_path / "m.json"
    assert fit_latency_main([str(prof), "-o", str(out)]) == 0
    raw = json.loads(out.read_text())
    assert raw["host"] == {"per_step": 0.002, "per_seq": 1e-05}
    model = load_fitted(str(out))
    s = StepShape.from_batch([(1, 99)] * 100)
    assert model.host_time(s) == pytest.approx(0.002 + 100 * 1e-05)
    assert model.host_time(StepShape()) == 0.0
    # None at all for a model without a host part.
    assert TRUE.host_time(s) == 0.0 and "host" not in TRUE.to_json()
    for name in SHIPPED:  # Vidur-derived: 2 ms + 10 us per sequence of assumed CPU overhead
        shipped = load_fitted(name)
        assert (shipped.host_per_step, shipped.host_per_seq) == (0.002, 1e-05)


HOST_KEYS = '"host" must be an object with keys among per_step, per_seq (CPU seconds per step and per sequence); got'


@pytest.mark.parametrize("host, message", [
    ({"per_step": 0.002, "per_sequence": 1e-5}, f"{HOST_KEYS} ['per_sequence', 'per_step']"),
    ([0.002], f"{HOST_KEYS} [0.002]"),
    ({"per_step": -0.002}, "fitted latency 'truth': host per_step must be a finite number >= 0, got -0.002"),
    ({"per_seq": "1e-5"}, "fitted latency 'truth': host per_seq must be a finite number >= 0, got '1e-5'"),
    ({"per_step": True}, "fitted latency 'truth': host per_step must be a finite number >= 0, got True"),
    # milliseconds where seconds were meant: more than the whole shortest step, 0.009 + 9e-8 + 7e-6 + 0.003
    ({"per_step": 2, "per_seq": 0.01}, "fitted latency 'truth': host per_step + per_seq = 2.01 s exceeds the whole "
                                       "0.0120071 s of a one-sequence decode step; host time is the CPU part of a "
                                       "step (in seconds, not milliseconds)"),
])
def test_a_bad_host_object_is_a_clear_error_naming_the_file(tmp_path, host, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**TRUE.to_json(), "host": host}))
    with pytest.raises(FitError) as err:
        load_fitted(str(path))
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize("key, value, shown", [
    ("provenance", None, "null"), ("provenance", 5, "5"), ("fit", [1], "[1]"), ("provenance", "abc", '"abc"'),
])
def test_a_provenance_or_fit_that_is_not_an_object_is_a_clear_error_naming_the_file(tmp_path, key, value, shown):
    """null, 5 and [1] raised TypeError (a traceback from sim run); "abc" an error naming no file."""
    path = tmp_path / "m.json"
    path.write_text(json.dumps({**TRUE.to_json(), key: value}))
    with pytest.raises(FitError) as err:
        load_fitted(str(path))
    assert str(err.value) == f'{path}: "{key}" must be a JSON object, got {shown}'


def test_build_dispatch():
    m = build(LatencyConfig(kind="fitted", name="a100-llama-3.1-8b"), load_model("llama-3.1-8b"),
              load_gpu("a100-80gb"), 1)
    assert isinstance(m, FittedLatency) and m.name == "a100-llama-3.1-8b"
    assert set(SHIPPED) <= set(available())


def test_cli_fits_and_reports(tmp_path, capsys):
    prof = tmp_path / "p.csv"
    write_profile(prof, Profile(synthetic_rows(TRUE, n=60), {"gpu": "test", "model": "m", "date": "d"}))
    out = tmp_path / "fit.json"
    assert fit_latency_main([str(prof), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "held-out MAPE" in printed and "R²" in printed
    model = load_fitted(str(out))
    assert model.name == "fit" and model.provenance["gpu"] == "test"
    noisy = tmp_path / "noisy.csv"
    write_profile(noisy, Profile(synthetic_rows(TRUE, n=60, noise=0.1), {"gpu": "test", "model": "m", "date": "d"}))
    assert fit_latency_main([str(noisy), "-o", str(out), "--max-mape", "0.001"]) == 1
    assert re.fullmatch(r"error: held-out MAPE \d+\.\d\d% exceeds --max-mape 0.001\n", capsys.readouterr().err)


@pytest.mark.parametrize("bad, expected", [("-1", "a finite number > 0"), ("0", "a finite number > 0"),
                                           ("nan", "a finite number > 0"), ("x", "a number")])
def test_cli_refuses_a_max_mape_that_no_fit_could_meet_before_fitting(tmp_path, capsys, bad, expected):
    out = tmp_path / "fit.json"
    with pytest.raises(SystemExit) as exit_:
        fit_latency_main([str(tmp_path / "p.csv"), "-o", str(out), "--max-mape", bad])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m sim fit-latency: error: argument --max-mape: expected {expected}, got '{bad}'")
    assert not out.exists()


def test_cli_bad_input_exits_1_with_message(tmp_path, capsys):
    prof = tmp_path / "p.csv"
    prof.write_text("num_seqs,num_tokens\n1,2\n")
    assert fit_latency_main([str(prof), "-o", str(tmp_path / "x.json")]) == 1
    assert capsys.readouterr().err == (
        f"error: {prof}:1: missing column(s) num_decode, decode_kv_tokens, prefill_tokens, prefill_attn_pairs, "
        "prefill_kv_tokens, seconds; expected num_seqs,num_tokens,num_decode,decode_kv_tokens,prefill_tokens,"
        "prefill_attn_pairs,prefill_kv_tokens,seconds\n")
    assert fit_latency_main([str(tmp_path / "none.csv"), "-o", str(tmp_path / "x.json")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.csv'}: no such profile file\n"


batch = st.lists(st.tuples(st.integers(1, 4096), st.integers(0, 16384)), min_size=1, max_size=30)


@functools.cache
def _shipped() -> tuple[FittedLatency, ...]:
    return tuple(load_fitted(n) for n in SHIPPED)


@settings(max_examples=50)
@given(batch, st.integers(1, 2048), st.integers(1, 1024))
def test_shipped_models_monotone(b, extra_new, extra_ctx):
    for m in _shipped():
        base = m.step_time(StepShape.from_batch(b))
        assert m.step_time(StepShape.from_batch([(n, c + extra_ctx) for n, c in b])) >= base
        assert m.step_time(StepShape.from_batch(b + [(extra_new, 0)])) > base


def test_too_few_steps_name_the_count_the_split_needs():
    """13 steps read "needs at least 14", and 14 then "need 12 training steps": the least that fits is 15."""
    from sim.latency.base import StepShape
    from sim.latency.fitted import FitError, fit_profile
    from sim.latency.profile import ProfileRow

    rows = [ProfileRow(StepShape.from_batch([(16 * (i + 1), 0)]), 0.01 * (i + 1)) for i in range(15)]
    for n in (13, 14):
        with pytest.raises(FitError) as err:
            fit_profile(rows[:n])
        assert str(err.value) == (f"profile has {n} steps; fitting 6 coefficients on 12 or more and testing on 2 or "
                                  "more, with a held-out share of 0.2, needs at least 15")
    fit_profile(rows)


def test_a_profile_of_one_repeated_shape_is_fitted_with_a_warning():
    """Twenty copies of one step fit "exactly" (rc 0) and predicted 82 s for an 8192-token prefill, silently."""
    from sim.latency.base import StepShape
    from sim.latency.fitted import fit_profile
    from sim.latency.profile import ProfileRow

    _, report = fit_profile([ProfileRow(StepShape.from_batch([(64, 0)]), 0.01)] * 20)
    assert report["warning"].startswith("the profile's 1 distinct step shape(s) do not vary tokens, attention pairs, "
                                        "KV tokens read and sequences independently (rank 1 of 5)")


def test_a_fit_of_an_engine_profile_is_checked_by_its_spec_names_not_the_device_name(tmp_path):
    """engine profile records the CUDA device name ("NVIDIA H100 80GB HBM3"): compared with the spec name
    "h100", every fit of a measured profile was refused on its own GPU."""
    from engine.profile import gpu_spec_of
    from sim.latency import FittedElsewhere

    assert [gpu_spec_of(d) for d in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L4")] == [
        "h100", "a100-80gb", None]
    raw = json.loads((Path(__file__).resolve().parents[1] / "sim/latency/models/h100-llama-3.1-8b-est.json")
                     .read_text())
    measured = {"gpu": "NVIDIA H100 80GB HBM3", "model": "llama-3.1-8b (config.json written by engine.profile; "
                "dummy weights)", "gpu_spec": "h100", "model_spec": "llama-3.1-8b"}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({**raw, "provenance": measured}))
    cfg = LatencyConfig(kind="fitted", name=str(path))
    build(cfg, load_model("llama-3.1-8b"), load_gpu("h100"))  # its own engine
    with pytest.raises(FittedElsewhere, match=r"was fitted to llama-3.1-8b on 1 x h100, not this engine's "
                                              r"llama-3.1-8b on 1 x a100-80gb"):
        build(cfg, load_model("llama-3.1-8b"), load_gpu("a100-80gb"))
    # Without the spec names the device's own names are compared, and are no engine's: refused
    # (they were "nothing to check", and the fit timed any GPU at all).
    path.write_text(json.dumps({**raw, "provenance": {k: measured[k] for k in ("gpu", "model")}}))
    for gpu in ("a100-80gb", "h100"):
        with pytest.raises(FittedElsewhere, match=r"was fitted to llama-3.1-8b \(config.json written by engine.profile; "
                                                  r"dummy weights\) on 1 x NVIDIA H100 80GB HBM3, not this engine's"):
            build(cfg, load_model("llama-3.1-8b"), load_gpu(gpu))
    # The way out is in the message: a device's own name is never a spec's.
    with pytest.raises(FittedElsewhere, match=r"; a profile names the spec it was taken on with a '# model_spec:' "
                                              r"line and a '# gpu_spec:' line \(a GPU or model no shipped spec "
                                              r"describes needs its own spec file, given by path: engine.gpu: "
                                              r"my.gpu.json\)$"):
        build(cfg, load_model("llama-3.1-8b"), load_gpu("h100"))
    path.write_text(json.dumps({**raw, "provenance": {k: measured[k] for k in ("gpu", "model", "model_spec")}}))
    with pytest.raises(FittedElsewhere, match=r"1 x NVIDIA H100 80GB HBM3, .* with a '# gpu_spec:' line \(a GPU"):
        build(cfg, load_model("llama-3.1-8b"), load_gpu("h100"))


@pytest.mark.parametrize("provenance, engine_gpu", [({"gpu": "v100", "model": "llama-3.1-8b"}, "a100-80gb"),
                                                     ({"gpu": "h100", "model": "llama-2-7b"}, "h100"),
                                                     ({"gpu": "v100"}, "h100")])
def test_a_fit_naming_a_gpu_or_model_without_a_spec_is_refused_on_another(tmp_path, provenance, engine_gpu):
    """_spec_named ignored a name no spec has: a fit to "v100" ran on an A100 without a word."""
    from sim.latency import FittedElsewhere

    path = tmp_path / "m.json"
    path.write_text(json.dumps({**TRUE.to_json(), "provenance": provenance}))
    cfg = LatencyConfig(kind="fitted", name=str(path))
    with pytest.raises(FittedElsewhere, match=r"was fitted to .* not this engine's llama-3.1-8b on 1 x "):
        build(cfg, load_model("llama-3.1-8b"), load_gpu(engine_gpu))
    path.write_text(json.dumps({**TRUE.to_json(), "provenance": {"note": "hand-made"}}))
    build(cfg, load_model("llama-3.1-8b"), load_gpu(engine_gpu))  # names neither: a hand-made file, not checked


@pytest.mark.parametrize("missing", ["gpu", "model"])
def test_a_profile_that_names_no_gpu_or_model_is_not_fitted(tmp_path, capsys, missing):
    """Without them the fitted model records no engine, and ran on any GPU (and any model)."""
    prof, out = tmp_path / "p.csv", tmp_path / "fit.json"
    write_profile(prof, Profile(synthetic_rows(TRUE, n=60), {k: v for k, v in {"gpu": "a100-80gb", "model":
                                                              "llama-3.1-8b"}.items() if k != missing}))
    assert fit_latency_main([str(prof), "-o", str(out)]) == 1
    assert capsys.readouterr().err == (f"error: {prof}: no '# {missing}:' line (or '# {missing}_spec:') above the "
                                       f"header; the fitted model records the {missing} it times, and is refused on "
                                       f"another; add e.g. '# {missing}: {'a100-80gb' if missing == 'gpu' else 'llama-3.1-8b'}'\n")
    assert not out.exists()


def test_a_profiles_gpu_count_is_kept_and_checked(tmp_path):
    """``# tensor_parallel: 4`` was free form and dropped: a fit of four GPUs' steps timed one."""
    from sim.latency import FittedElsewhere

    prof, out = tmp_path / "p.csv", tmp_path / "fit.json"
    write_profile(prof, Profile(synthetic_rows(TRUE, n=60), {"gpu": "a100-80gb", "model": "llama-3.1-70b",
                                                              "tensor_parallel": "4"}))
    assert fit_latency_main([str(prof), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["provenance"]["tensor_parallel"] == 4
    cfg = LatencyConfig(kind="fitted", name=str(out))
    build(cfg, load_model("llama-3.1-70b"), load_gpu("a100-80gb"), 4)
    with pytest.raises(FittedElsewhere, match=r"on 4 x a100-80gb, not this engine's llama-3.1-70b on 2 x a100-80gb"):
        build(cfg, load_model("llama-3.1-70b"), load_gpu("a100-80gb"), 2)


def test_fit_errors_name_the_profile_and_the_output_option(tmp_path, capsys):
    """"profile has 2 steps; ..." named no file; an -o that is a directory failed after the fit
    with "[Errno 21] Is a directory: 'adir'", naming no option."""
    small, good = tmp_path / "small.csv", tmp_path / "good.csv"
    meta = {"gpu": "a100-80gb", "model": "llama-3.1-8b"}
    write_profile(small, Profile(synthetic_rows(TRUE, n=3), meta))
    write_profile(good, Profile(synthetic_rows(TRUE, n=60), meta))
    assert fit_latency_main([str(small), "-o", str(tmp_path / "x.json")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {small}: profile has 3 steps; ")
    (tmp_path / "adir").mkdir()
    assert fit_latency_main([str(small), "-o", str(tmp_path / "adir")]) == 1  # before reading the profile
    assert capsys.readouterr().err == f"error: -o {tmp_path / 'adir'}: is a directory, expected a file to write\n"
    assert fit_latency_main([str(good), "-o", str(tmp_path / "none" / "x.json")]) == 1
    assert capsys.readouterr().err == (f"error: -o {tmp_path / 'none' / 'x.json'}: directory {tmp_path / 'none'} "
                                       f"does not exist\n")


@pytest.mark.parametrize("fraction", [1e-9, 0.9999999])
def test_a_held_out_share_no_profile_can_meet_is_one_error(fraction):
    """The search for the least profile found none and ended in a StopIteration traceback."""
    from sim.latency.fitted import FitError, fit_profile

    with pytest.raises(FitError) as err:
        fit_profile([], test_fraction=fraction)
    assert str(err.value) == (f"a held-out share of {fraction!r} leaves fewer than 2 test steps or 12 training "
                              "steps in any profile of up to 100,000 steps; use a share such as 0.2")
