"""`python -m engine profile`: no-GPU error path, grid, and shape bookkeeping on a fake engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine import profile as eprof
from engine.cli import build_parser
from sim.latency.base import StepShape

ROOT = Path(__file__).resolve().parents[1]


def test_no_gpu_exits_1_with_one_line(tmp_path):
    out = tmp_path / "p.csv"
    # Hide any GPU, so that this checks the no-GPU path on a GPU machine too.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "engine", "profile", "-o", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "python -m engine profile: no CUDA GPU is visible (torch.cuda.is_available() is False); run this on a GPU machine"
    ]
    assert not out.exists()


def test_help_works_without_vllm():
    # vllm and torch made unimportable in the child, as on a machine without the `engine` extra.
    hide = ("import runpy, sys; sys.modules['vllm'] = sys.modules['torch'] = None; "
            "runpy.run_module('engine', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", hide, "profile", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "fit-latency" in proc.stdout, proc.stderr


def test_gpu_problem_messages(monkeypatch):
    fake_torch = types.ModuleType("torch")
    fake_torch.cuda = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert "torch.cuda.is_available() is False" in eprof.gpu_problem()
    fake_torch.cuda = types.SimpleNamespace(is_available=lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    assert "vllm is not installed" in eprof.gpu_problem()
    monkeypatch.setitem(sys.modules, "torch", None)
    assert "torch is not installed" in eprof.gpu_problem()


def test_cli_dispatch_has_profile():
    args = build_parser().parse_args(["profile", "-o", "x.csv", "--quick"])
    assert args.run is eprof.run and args.quick


def test_config_json_is_llama_31_8b(tmp_path):
    cfg = json.loads((eprof.write_model_dir(tmp_path) / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (32, 8, 128256)
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["torch_dtype"] == "bfloat16"


def test_grid_covers_kinds_within_limits():
    cases = eprof.profile_cases(max_tokens=4096, max_seqs=128, kv_tokens=200_000)
    assert {c.kind for c in cases} == {"prefill", "decode", "mixed"}
    for c in cases:
        assert c.tokens() <= 4096 and c.decode_batch + len(c.chunks) <= 128 and c.kv_tokens(64) <= 200_000
        assert all(ctx % 16 == 0 for _, ctx in c.chunks)
    assert len(eprof.profile_cases(quick=True)) < len(cases)


# ---- a fake engine with vLLM v1's observable behaviour: chunked prefill, prefix cache, FCFS


@dataclass
class _R:
    prompt: list
    max_tokens: int
    computed: int
    cached: int
    generated: int = 0
    finished: bool = False


class FakeEngine:
    BLOCK = 16

    def __init__(self, budget=512, id_suffix=""):
        self.budget, self.reqs, self.cache, self.now, self.shapes = budget, {}, set(), 0.0, []
        self.id_suffix = id_suffix  # some vLLM releases report internal ids with a suffix

    def add_request(self, rid, prompt, params):
        ids = prompt["prompt_token_ids"]
        hit = 0
        while hit + self.BLOCK < len(ids) and tuple(ids[: hit + self.BLOCK]) in self.cache:
            hit += self.BLOCK
        self.reqs[rid] = _R(ids, params, hit, hit)

    def abort_request(self, ids):
        for r in ids:
            self.reqs.pop(r, None)

    def has_unfinished_requests(self):
        return bool(self.reqs)

    def step(self):
        left, batch, outs = self.budget, [], []
        for rid, r in list(self.reqs.items()):
            new = min(len(r.prompt) - r.computed, left) if r.computed < len(r.prompt) else 1
            if new <= 0 or left <= 0:
                continue
            batch.append((new, r.computed))
            left -= new
            r.computed += new
            if r.computed >= len(r.prompt):
                for b in range(self.BLOCK, len(r.prompt) + 1, self.BLOCK):
                    self.cache.add(tuple(r.prompt[:b]))
                r.generated += 1
                r.finished = r.generated >= r.max_tokens
                outs.append(types.SimpleNamespace(request_id=rid + self.id_suffix, finished=r.finished, num_cached_tokens=r.cached,
                                                  outputs=[types.SimpleNamespace(token_ids=[7] * r.generated)]))
                if r.finished:
                    del self.reqs[rid]
        shape = StepShape.from_batch(batch) if batch else StepShape()
        self.shapes.append(shape)
        self.now += 0.001 + 1e-6 * shape.num_tokens
        return outs


@pytest.mark.parametrize("case", [
    eprof.Case(chunks=((64, 0),)),
    eprof.Case(chunks=((100, 1024),)),  # context beyond the budget: prefix built over several steps
    eprof.Case(chunks=((32, 0),) * 3),
    eprof.Case(8, 300),
    eprof.Case(4, 700, ((200, 160),)),
])
def test_runner_records_the_shapes_the_engine_ran(case):
    eng = FakeEngine()
    runner = eprof.StepRunner(eng, lambda n: n, repeats=3, token_budget=eng.budget, clock=lambda: eng.now)
    rows = runner.run(case)
    assert len(rows) == 3 and runner.dropped == 0
    for row in rows:
        match = [s for s in eng.shapes if s == row.shape]
        assert match, row.shape
        assert row.seconds == pytest.approx(0.001 + 1e-6 * row.shape.num_tokens)
        assert row.shape.num_decode == case.decode_batch
        assert row.shape.prefill_tokens == sum(n for n, _ in case.chunks)
    if case.decode_batch:  # decode contexts advance by one per timed step
        kv = [r.shape.decode_kv_tokens for r in rows]
        assert kv[1] - kv[0] == case.decode_batch and kv[2] - kv[1] == case.decode_batch
        assert kv[0] >= case.decode_batch * (case.decode_ctx + 1)
    assert not eng.reqs  # drained


def test_runner_drops_steps_that_did_not_match():
    eng = FakeEngine(budget=100)  # a 200-token chunk cannot run in one step
    runner = eprof.StepRunner(eng, lambda n: n, repeats=2, clock=lambda: eng.now)
    assert runner.run(eprof.Case(chunks=((200, 0),))) == []
    assert runner.dropped == 2


def test_runner_maps_suffixed_request_ids():
    eng = FakeEngine(id_suffix="-1a2b3c4d")
    runner = eprof.StepRunner(eng, lambda n: n, repeats=2, token_budget=eng.budget, clock=lambda: eng.now)
    rows = runner.run(eprof.Case(4, 100, ((64, 32),)))
    assert len(rows) == 2 and rows[0].shape.num_decode == 4 and not eng.reqs


def test_the_engine_core_runs_in_process_even_where_the_machine_says_otherwise(monkeypatch, tmp_path):
    """With VLLM_ENABLE_V1_MULTIPROCESSING=1 already set (a default was only a default), step()
    would time waits on a queue while the engine core ran in another process."""
    import argparse

    import vllm

    from engine import profile

    seen = {}

    def fake_llm(**kwargs):
        seen["env"] = profile.os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        seen["kwargs"] = kwargs
        return "llm"

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setattr(vllm, "LLM", fake_llm)
    args = argparse.Namespace(max_num_batched_tokens=2048, max_num_seqs=256, gpu_memory_utilization=0.9,
                              max_model_len=32768, enforce_eager=False, seed=0)
    assert profile._make_llm(args, tmp_path) == "llm"
    assert seen["env"] == "0"
    assert seen["kwargs"]["async_scheduling"] is False and seen["kwargs"]["load_format"] == "dummy"


def _profile(tmp_path, *options):
    """The command without a GPU, run where ``afile`` is a file."""
    (tmp_path / "afile").write_text("")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", "profile", *options], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("options, message", [
    (["--repeats", "-1"], "argument --repeats: expected an integer >= 1, got -1"),
    (["--repeats", "0"], "argument --repeats: expected an integer >= 1, got 0"),
    (["--max-num-seqs", "-4"], "argument --max-num-seqs: expected an integer >= 1, got -4"),
    (["--max-num-batched-tokens", "0"], "argument --max-num-batched-tokens: expected an integer >= 1, got 0"),
    (["--max-model-len", "0"], "argument --max-model-len: expected an integer from 1 to 131,072, got 0"),
    (["--max-model-len", "200000"], "argument --max-model-len: expected an integer from 1 to 131,072, got 200000"),
    (["--gpu-memory-utilization", "7"], "argument --gpu-memory-utilization: expected a number in (0, 1], got '7'"),
    (["--gpu-memory-utilization", "0"], "argument --gpu-memory-utilization: expected a number in (0, 1], got '0'"),
    (["--gpu-memory-utilization", "nan"], "argument --gpu-memory-utilization: expected a number in (0, 1], got 'nan'"),
    (["--seed", "-1"], "argument --seed: expected an integer from 0 to 4,294,967,295, got -1"),
])
def test_bad_numbers_are_usage_errors_before_the_gpu_check(tmp_path, options, message):
    """They were passed on to vLLM, or hidden behind "no CUDA GPU is visible" on a machine without one."""
    proc = _profile(tmp_path, "-o", "p.csv", *options)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"python -m engine profile: error: {message}"


@pytest.mark.parametrize("options, message", [
    (["-o", "/nonexistent/x.csv"], "-o/--output /nonexistent/x.csv: directory /nonexistent does not exist"),
    (["-o", "afile/x.csv"], "-o/--output afile/x.csv: {tmp}/afile is not a directory"),
    (["-o", "."], "-o/--output .: is a directory, expected a file to write"),
    (["-o", ""], "-o/--output '': expected a path"),
    (["-o", "p.csv", "--workdir", "afile"], "--workdir afile: exists and is not a directory"),
    (["-o", "p.csv", "--workdir", "afile/sub/dir"], "--workdir afile/sub/dir: {tmp}/afile is not a directory"),
    (["-o", "p.csv", "--max-num-seqs", "300", "--max-num-batched-tokens", "256"],
     "--max-num-batched-tokens (256) must be >= --max-num-seqs (300), as vLLM requires"),
])
def test_paths_that_cannot_be_written_are_refused_before_the_gpu_check(tmp_path, options, message):
    """A FileNotFoundError or NotADirectoryError traceback came when the profile was written, after the run."""
    proc = _profile(tmp_path, *options)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == f"python -m engine profile: error: {message.format(tmp=tmp_path)}\n"


def test_a_path_problem_is_found_before_the_profile_runs(tmp_path, monkeypatch):
    """On a GPU machine: nothing is profiled for an -o that cannot be written."""
    monkeypatch.setattr(eprof, "gpu_problem", lambda: None)
    monkeypatch.setattr(eprof, "profile_on_gpu", lambda args: pytest.fail("profiled before checking -o"))
    args = build_parser().parse_args(["profile", "-o", str(tmp_path / "missing" / "p.csv")])
    assert args.run(args) == 2


def test_a_directory_that_takes_no_files_is_refused(tmp_path, monkeypatch, capsys):
    """A directory the user may not write in. Root writes anywhere, so the permission is
    denied by ``os.access`` itself, the check `path_problem` makes, not by a chmod."""
    import traces.argtypes

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(traces.argtypes.os, "access",
                        lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    monkeypatch.setattr(eprof, "gpu_problem", lambda: pytest.fail("checked the GPU before -o"))
    args = build_parser().parse_args(["profile", "-o", str(locked / "p.csv")])
    assert args.run(args) == 2
    assert capsys.readouterr().err == (f"python -m engine profile: error: -o/--output {locked / 'p.csv'}: "
                                       "cannot write there: permission denied\n")
