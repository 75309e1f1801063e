"""Input validation of experiment configs: spec files, YAML numbers and aliases,
engine bounds mirrored from vLLM, and errors blamed on the key that was set."""

from __future__ import annotations

import json
import re
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sim.cli import main as cli_main
from sim.config import ConfigError, EngineConfig, WorkloadConfig
from sim.config_layers import parse_override
from sim.experiments import load_file, resolve
from sim.yaml_io import MAX_NODES
from sim.hardware import SPEC_DIR, SpecError, available, load_gpu, load_model
from sim.simulate import SimulationError, check_fits, simulate
from sim.sweep import load_sweep
from test_experiments import error

BASE = """\
experiments:
  t:
    workload: {generator: bfcl, params: {programs: 5, rate: 5.0}}
    latency: {kind: constant, seconds: 0.01}
    policies: [fcfs]
"""


def with_engine(engine: str) -> str:
    """BASE with experiment t's ``engine:`` mapping (flow style, on exp.yaml:6), if any."""
    return BASE if not engine else BASE.replace("    policies: [fcfs]\n", f"    policies: [fcfs]\n    engine: {engine}\n")


@pytest.fixture
def exp(tmp_path, monkeypatch):
    """Writes an experiments file (BASE plus ``extra`` at the top level) and returns its name."""
    monkeypatch.chdir(tmp_path)

    def _write(extra: str = "", base: str = BASE) -> str:
        (tmp_path / "exp.yaml").write_text(base + textwrap.dedent(extra))
        return "exp.yaml"

    return _write


# --- 1: model and GPU spec files -------------------------------------------------------


def spec_file(tmp_path, kind: str, **changes) -> str:
    """A copy of a shipped spec, pretty-printed (one field per line), with ``changes``."""
    base = "llama-3.1-8b.model.json" if kind == "model" else "a100-80gb.gpu.json"
    raw = {**json.loads((SPEC_DIR / base).read_text()), **changes}
    path = tmp_path / f"x.{kind}.json"
    path.write_text(json.dumps(raw, indent=2))
    return str(path)


@pytest.mark.parametrize(
    "kind, field, value, expected",
    [
        ("model", "num_layers", 0, "expected an integer >= 1, got 0"),
        ("model", "dtype_bytes", 0, "expected an integer >= 1, got 0"),
        ("model", "dtype_bytes", -1, "expected an integer >= 1, got -1"),
        ("model", "head_dim", 0, "expected an integer >= 1, got 0"),
        ("model", "num_kv_heads", 0, "expected an integer >= 1, got 0"),
        ("model", "hidden_size", -4096, "expected an integer >= 1, got -4096"),
        ("model", "num_heads", -32, "expected an integer >= 1, got -32"),
        ("model", "num_params", 0, "expected an integer >= 1, got 0"),
        ("model", "tensor_parallel", -1, "expected an integer >= 1, got -1"),
        ("model", "num_layers", "32", "expected an integer >= 1, got '32'"),
        ("model", "num_layers", 32.5, "expected an integer >= 1, got 32.5"),
        ("model", "num_layers", True, "expected an integer >= 1, got True"),
        ("model", "name", "", "expected a non-empty string, got ''"),
        ("model", "num_kv_heads", 5, "expected a divisor of num_heads (32), got 5"),
        ("gpu", "pcie_bandwidth", 0, "expected a finite number > 0, got 0"),
        ("gpu", "peak_flops", "312e12", "expected a finite number > 0, got '312e12'"),
        ("gpu", "memory_bytes", "85899345920", "expected an integer >= 1, got '85899345920'"),
        ("gpu", "hbm_bandwidth", -1.0, "expected a finite number > 0, got -1.0"),
    ],
)
def test_spec_file_fields_are_checked_at_load(tmp_path, kind, field, value, expected):
    path = spec_file(tmp_path, kind, **{field: value})
    line = next(i for i, text in enumerate(open(path), 1) if f'"{field}"' in text)
    with pytest.raises(SpecError) as info:
        (load_model if kind == "model" else load_gpu)(path)
    assert str(info.value) == f"{path}:{line}: field {field!r}: {expected}"


def test_spec_integer_too_long_for_python_names_the_field(tmp_path):
    path = spec_file(tmp_path, "model", num_params=-1)
    with open(path) as fh:
        text = fh.read()
    with open(path, "w") as fh:  # past the 4300 digits Python reads; json.dumps cannot write it
        fh.write(text.replace('"num_params": -1', '"num_params": ' + "9" * 5000))
    line = next(i for i, text in enumerate(open(path), 1) if '"num_params"' in text)
    with pytest.raises(SpecError) as info:
        load_model(path)
    assert str(info.value) == f"{path}:{line}: field 'num_params': expected an integer >= 1, got a 5000-digit integer"


def test_spec_integer_past_a_float_names_the_field(tmp_path):
    """400 digits: within what Python reads, past what the KV arithmetic's floats hold (OverflowError)."""
    for kind, field in (("gpu", "memory_bytes"), ("model", "num_params")):
        path = spec_file(tmp_path, kind, **{field: -1})
        text = Path(path).read_text()
        Path(path).write_text(text.replace(f'"{field}": -1', f'"{field}": 1' + "0" * 400))
        line = next(i for i, text in enumerate(open(path), 1) if f'"{field}"' in text)
        with pytest.raises(SpecError) as info:
            (load_model if kind == "model" else load_gpu)(path)
        assert str(info.value) == f"{path}:{line}: field {field!r}: expected at most 2**53, got an integer of 401 digits"
    path = spec_file(tmp_path, "gpu", peak_flops=-1)
    Path(path).write_text(Path(path).read_text().replace('"peak_flops": -1', '"peak_flops": 1' + "0" * 400))
    with pytest.raises(SpecError, match=r"field 'peak_flops': expected a finite number > 0, got an integer of 401 digits$"):
        load_gpu(path)
    deep = tmp_path / "deep.gpu.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SpecError, match=r"deep.gpu.json: malformed JSON: nested too deeply for a gpu spec$"):
        load_gpu(str(deep))


def test_spec_file_errors_name_the_set_key(exp, tmp_path):
    path = spec_file(tmp_path, "model", num_layers=0)
    assert error("t", exp(), [f"engine.model={path}"]) == (
        f"--set engine.model={path}: experiment 't': engine.model: {path}:4: field 'num_layers': "
        "expected an integer >= 1, got 0"
    )


def test_spec_file_shape_errors(tmp_path):
    path = tmp_path / "x.model.json"
    path.write_text("[1, 2]")
    with pytest.raises(SpecError, match=r"x.model.json: expected a JSON object"):
        load_model(str(path))
    path.write_text('{"num_layers": 1, "num_layers": 2}')
    with pytest.raises(SpecError, match=r"x.model.json:1: field 'num_layers': duplicate key"):
        load_model(str(path))


def test_a_key_given_twice_in_a_spec_is_located_at_its_second_line(exp, tmp_path):
    """The first occurrence's line was given: the one line of the two that is right."""
    lines = (SPEC_DIR / "llama-3.1-8b.model.json").read_text().splitlines()
    first = next(i for i, text in enumerate(lines) if '"num_layers"' in text)
    lines.insert(len(lines) - 1, '  , "num_layers": 32')  # before the closing brace
    copy = tmp_path / "copy.json"
    copy.write_text("\n".join(lines) + "\n")
    msg = error("t", exp(), [f"engine.model={copy}"])
    assert f"{copy}:{len(lines) - 1}: field 'num_layers': duplicate key" in msg and first + 1 != len(lines) - 1, msg


def test_shipped_specs_load():
    assert available("model") and available("gpu")
    for name in available("model"):
        assert load_model(name).num_layers >= 1
    for name in available("gpu"):
        assert load_gpu(name).memory_bytes >= 1


# --- 2: replicas --------------------------------------------------------------------------


def test_replicas_have_a_cap(exp):
    assert resolve("t", exp(), ["engine.replicas=4096"]).engine.replicas == 4096
    assert error("t", exp(), ["engine.replicas=100000000"]) == (
        "--set engine.replicas=100000000: experiment 't': engine.replicas: "
        "expected at most 4,096 replicas, got 100000000"
    )


# --- 3: alias bombs ------------------------------------------------------------------------


BOMB = """\
a: &a [x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
"""


def test_alias_bomb_fails_fast(exp):
    path = exp(base=BOMB + BASE)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"^exp.yaml:\d+: more than {MAX_NODES:,} values with its aliases"):
        load_file(path)
    assert time.perf_counter() - start < 1.0


def test_alias_bomb_in_a_set_value_fails_fast():
    levels = ["&a [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&{new} [{', '.join([f'*{old}'] * 9)}]" for old, new in zip("abcdefg", "bcdefgh")]
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"^--set description=\[.*\]: more than 100,000 values"):
        parse_override(f"description=[{', '.join(levels)}]")
    assert time.perf_counter() - start < 1.0


def test_small_aliases_still_work(exp):
    base = "defaults:\n  engine: &e {replicas: 2}\n" + BASE.replace("policies: [fcfs]", "policies: [fcfs]\n    engine: *e")
    assert resolve("t", exp(base=base)).engine.replicas == 2


# --- 4: YAML 1.2 numbers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [("1e3", 1000.0), ("5e0", 5.0), ("-1.5E-2", -0.015), ("010", 10), ("0o10", 8), ("0x10", 16),
     ("1:00", "1:00"), ("1_000", "1_000"), ("12", 12), (".5", 0.5)],
)
def test_set_values_use_yaml_1_2_numbers(text, value):
    assert parse_override(f"k={text}") == (("k",), value)


@pytest.mark.parametrize(
    "text, value",
    [("true", True), ("False", False), ("TRUE", True), ("yes", "yes"), ("no", "no"), ("on", "on"),
     ("Off", "Off"), ("y", "y"), ("null", None), ("~", None)],
)
def test_set_values_use_yaml_1_2_booleans(text, value):
    assert parse_override(f"k={text}") == (("k",), value)


def test_a_yaml_1_1_boolean_word_is_refused_where_a_boolean_belongs(exp):
    path = exp(base=BASE.replace("policies: [fcfs]", "policies: [fcfs]\n    engine: {enable_prefix_caching: off}"))
    assert error("t", path) == (
        "exp.yaml:6: experiment 't': engine.enable_prefix_caching: expected true or false, got 'off' "
        "(YAML 1.2 reads it as a string, not a boolean)"
    )


def test_file_and_set_read_numbers_alike(exp):
    path = exp(base=BASE.replace("rate: 5.0", "rate: 5e0").replace("programs: 5", "programs: 010"))
    cfg = resolve("t", path)
    assert cfg.workload.params == {"programs": 10, "rate": 5.0}
    assert resolve("t", path, ["workload.params.rate=1e3"]).workload.params["rate"] == 1000.0
    assert error("t", path, ["workload.params.programs=1:00"]) == (
        "--set workload.params.programs=1:00: experiment 't': workload.params.programs: "
        "expected an integer >= 1, got '1:00'"
    )


def test_sweep_grid_reads_scientific_numbers(exp):
    path = exp("""\
        sweeps:
          s: {experiment: t, grid: {workload.params.rate: [1e1, 2e1]}}
          r: {experiment: t, grid: {workload.params.rate: {start: 1e0, stop: 2e0, num: 2}}}
        """)
    assert [p.params for p in load_sweep("s", path).points] == [
        (("workload.params.rate", 10.0),), (("workload.params.rate", 20.0),)
    ]
    assert [p.params for p in load_sweep("r", path).points] == [
        (("workload.params.rate", 1.0),), (("workload.params.rate", 2.0),)
    ]


# --- 5, 6: KV capacity blamed on the key that was set ------------------------------------------


def test_huge_block_size_is_blamed_on_block_size(exp):
    msg = error("t", exp(), ["engine.block_size=100000000"])
    assert msg.startswith(
        "--set engine.block_size=100000000: experiment 't': engine.block_size: a block of 100000000 tokens "
        "needs 1.31e+04 GB of KV cache (131072 bytes per token for llama-3.1-8b), more than the 59.1 GB"
    )


@pytest.mark.parametrize("size", [7, 8, 1, 24])
def test_a_block_size_no_attention_backend_takes_is_refused(exp, size):
    """vLLM 0.26.0 takes any --block-size > 0, but its CUDA attention backends only multiples of 16:
    a block of 8 ran here, where that engine finds no backend and does not start."""
    assert error("t", exp(), [f"engine.block_size={size}"]) == (
        f"--set engine.block_size={size}: experiment 't': engine.block_size: expected a multiple of 16 tokens, as "
        f"vLLM 0.26.0's attention backends for these GPUs (FlashAttention, Triton, FlexAttention) take, got {size}")


@pytest.mark.parametrize("size", [16, 48, 256, 1024])
def test_every_multiple_of_16_is_a_block_size(exp, size):
    assert resolve("t", exp(), [f"engine.block_size={size}"]).engine.block_size == size


@pytest.mark.parametrize(
    "override, key",
    [("engine.activation_reserve_bytes=70000000000", "engine.activation_reserve_bytes"),
     ("engine.gpu_memory_utilization=0.21", "engine.gpu_memory_utilization")],
)
def test_memory_shortage_is_blamed_on_the_set_key(exp, override, key):
    msg = error("t", exp(), [override])
    assert msg.startswith(f"--set {override}: experiment 't': {key}: llama-3.1-8b does not fit")
    for term in ("engine.model", "engine.activation_reserve_bytes=", "engine.gpu_memory_utilization="):
        assert term in msg


def test_model_set_in_the_file_is_still_blamed_there(exp):
    path = exp(base=BASE.replace("policies: [fcfs]", "policies: [fcfs]\n    engine: {model: llama-3.1-70b, gpus_per_replica: 1}"))
    assert error("t", path).startswith("exp.yaml:6: experiment 't': engine.model: llama-3.1-70b does not fit")


def test_null_trace_is_blamed_on_the_set(exp):
    assert error("t", exp(), ["workload.trace=null"]) == (
        "--set workload.trace=null: experiment 't': workload.trace: got null; "
        "give exactly one of generator (with params) or trace, got neither"
    )


# --- 7: a call past an explicit num_gpu_blocks ----------------------------------------------------


def test_call_past_num_gpu_blocks_names_it():
    call = SimpleNamespace(id="c", prompt_tokens=20, output_tokens=5, context_of=None)
    programs = [SimpleNamespace(id="p", calls=[call])]
    engine = EngineConfig(num_gpu_blocks=1, gpus_per_replica=8)
    with pytest.raises(SimulationError) as info:
        check_fits(programs, 1, engine)
    assert str(info.value) == (
        "program 'p' call 'c': prompt_tokens + output_tokens = 25 exceeds the KV cache of one replica "
        "(16 tokens); it is engine.num_gpu_blocks=1 x engine.block_size=16: raise engine.num_gpu_blocks, "
        "or drop it to size the cache from the GPUs"
    )


# --- 8, 9: sweeps ----------------------------------------------------------------------------------


def test_times_with_no_other_grid_key(exp):
    path = exp("""\
        sweeps:
          s: {experiment: t, grid: {workload.params.rate: {start: 1, stop: 2, num: 2, times: engine.replicas}}}
        """)
    with pytest.raises(ConfigError) as info:
        load_sweep("s", path)
    assert str(info.value) == (
        "exp.yaml:7: sweep 's': grid.workload.params.rate.times: 'engine.replicas' is not another key of "
        "this grid; this grid varies no other key; add engine.replicas to it or drop times"
    )


def test_duplicate_grid_points_are_refused(exp):
    path = exp("""\
        sweeps:
          s:
            experiment: t
            grid:
              - {workload.params.rate: [1], seed: [0]}
              - {seed: [0], workload.params.rate: [1]}
          one: {experiment: t, grid: {seed: [1, 2, 1]}}
        """)
    with pytest.raises(ConfigError) as info:
        load_sweep("s", path)
    assert str(info.value) == (
        "exp.yaml:11: sweep 's': grid[1]: the point seed=0, workload.params.rate=1 is in the grid twice "
        "(grid[0] gives it too); each point runs once, remove one"
    )
    with pytest.raises(ConfigError, match=r"sweep 'one': grid: the point seed=1 is in the grid twice \(this case gives it twice\)"):
        load_sweep("one", path)


# --- 10, 11: vLLM's scheduler and tensor-parallel rules ----------------------------------------------


def test_token_budget_below_max_num_seqs(exp):
    assert error("t", exp(), ["engine.max_num_batched_tokens=1", "engine.max_num_seqs=256"]) == (
        "--set engine.max_num_batched_tokens=1: experiment 't': engine.max_num_batched_tokens: "
        "engine.max_num_batched_tokens (1) must be >= engine.max_num_seqs (256), as vLLM requires"
    )
    assert error("t", exp(), ["engine.max_num_seqs=4096"]).startswith(
        "--set engine.max_num_seqs=4096: experiment 't': engine.max_num_seqs: engine.max_num_batched_tokens (2048)"
    )
    cfg = resolve("t", exp(), ["engine.max_num_batched_tokens=8", "engine.max_num_seqs=8"])
    assert cfg.engine.max_num_batched_tokens == 8


@pytest.mark.parametrize("sets, seqs, budget", [
    # vLLM 0.26.0 (EngineArgs._set_default_max_num_seqs_and_batched_tokens_args): a budget given alone lowers
    # the default cap to it (this was refused against 256, where `vllm serve --max-num-batched-tokens 128` starts)
    (["engine.max_num_batched_tokens=128"], 128, 128),
    (["engine.max_num_batched_tokens=1"], 1, 1),
    (["engine.max_num_batched_tokens=4096"], 256, 4096),
    # without chunked prefill the default budget is raised to the context, so a whole prompt fits a step
    (["engine.enable_chunked_prefill=false"], 256, 131072),
    (["engine.enable_chunked_prefill=false", "engine.max_model_len=8192"], 256, 8192),
    (["engine.enable_chunked_prefill=false", "engine.max_model_len=1000"], 256, 2048),
    # ... and kept within max_num_seqs x the context, as for a tiny model
    (["engine.enable_chunked_prefill=false", "engine.max_model_len=100", "engine.max_num_seqs=4"], 4, 400),
    (["engine.max_model_len=100", "engine.max_num_seqs=4"], 4, 400),
    (["engine.gpu=h100", "engine.enable_chunked_prefill=false", "engine.max_model_len=4096"], 1024, 8192),
    (["engine.gpu=h100"], 1024, 8192),
])
def test_unset_sequence_cap_and_budget_take_vllm_serve_defaults(exp, sets, seqs, budget):
    cfg = resolve("t", exp(), sets)
    assert (cfg.engine.max_num_seqs, cfg.engine.max_num_batched_tokens) == (seqs, budget)


@pytest.mark.parametrize("base, sets, message", [
    # vLLM 0.26.0 (config/scheduler.py, verify_max_model_len) refuses to start without chunked prefill when the
    # budget is below max_model_len; the key set last is blamed.
    ("", ["engine.enable_chunked_prefill=false", "engine.max_num_batched_tokens=256"],
     "--set engine.max_num_batched_tokens=256: experiment 't': engine.max_num_batched_tokens: "
     "engine.max_num_batched_tokens (256) is smaller than the context of llama-3.1-8b (131072 tokens, "
     "engine.max_model_len unset) with engine.enable_chunked_prefill false, which vLLM refuses to start: a longer "
     "prompt could never be scheduled; set engine.max_model_len to at most 256, raise "
     "engine.max_num_batched_tokens, or turn chunked prefill on"),
    ("{max_num_batched_tokens: 256}", ["engine.enable_chunked_prefill=false"],
     "--set engine.enable_chunked_prefill=false: experiment 't': engine.enable_chunked_prefill: "
     "engine.max_num_batched_tokens (256) is smaller than the context of llama-3.1-8b"),
    ("{enable_chunked_prefill: false, max_num_batched_tokens: 8192, max_model_len: 8192}",
     ["engine.max_model_len=16384"],
     "--set engine.max_model_len=16384: experiment 't': engine.max_model_len: engine.max_num_batched_tokens "
     "(8192) is smaller than engine.max_model_len (16384) with engine.enable_chunked_prefill false"),
    ("{enable_chunked_prefill: false, max_num_batched_tokens: 8192}", [],
     "exp.yaml:6: experiment 't': engine.max_num_batched_tokens: engine.max_num_batched_tokens (8192) is smaller "
     "than the context of llama-3.1-8b (131072 tokens, engine.max_model_len unset)"),
])
def test_a_budget_below_the_context_without_chunking_is_refused(exp, base, sets, message):
    msg = error("t", exp(base=with_engine(base)), sets)
    assert msg.startswith(message), msg
    assert "vLLM refuses to start" in msg


def test_unchunked_budget_equal_to_the_context_starts(exp):
    cfg = resolve("t", exp(base=with_engine("{enable_chunked_prefill: false, max_num_batched_tokens: 8192}")),
                  ["engine.max_model_len=8192"])
    assert (cfg.engine.max_num_batched_tokens, cfg.engine.max_model_len) == (8192, 8192)


@pytest.mark.parametrize("gpus", [3, 100000])
def test_tensor_parallel_must_split_the_heads(exp, gpus):
    assert error("t", exp(), [f"engine.gpus_per_replica={gpus}"]) == (
        f"--set engine.gpus_per_replica={gpus}: experiment 't': engine.gpus_per_replica: "
        f"engine.gpus_per_replica={gpus} does not split the 32 attention heads and 8 KV heads of "
        "engine.model=llama-3.1-8b evenly, as vLLM's tensor parallelism requires; valid: 1, 2, 4, 8, 16, 32"
    )


def test_tensor_parallel_kv_head_rule(exp, tmp_path):
    # 12 heads, 4 KV heads: 6 divides the heads but neither divides nor is divided by the KV heads.
    path = spec_file(tmp_path, "model", num_heads=12, num_kv_heads=4)
    msg = error("t", exp(), [f"engine.model={path}", "engine.gpus_per_replica=6"])
    assert msg.endswith("12 attention heads and 4 KV heads of engine.model=" + path
                        + " evenly, as vLLM's tensor parallelism requires; valid: 1, 2, 4, 12")


# --- review: a key left at its default is never blamed over one that was set ---------------------


def test_a_defaulted_key_is_not_blamed_over_a_key_set_lower_down(exp):
    # The defaults set gpus_per_replica; the experiment's engine: line sets only replicas.
    path = exp("defaults:\n  engine: {gpus_per_replica: 3}\n",
               base=BASE.replace("policies: [fcfs]", "policies: [fcfs]\n    engine: {replicas: 2}"))
    msg = error("t", path)
    assert msg.startswith("exp.yaml:8: experiment 't': engine.gpus_per_replica: engine.gpus_per_replica=3 "), msg


def test_a_set_mapping_is_not_blamed_for_the_keys_it_left_alone(exp):
    path = exp("defaults:\n  engine: {max_num_batched_tokens: 8, max_num_seqs: 256}\n")
    msg = error("t", path, ["engine={replicas: 2}"])
    assert msg.startswith("exp.yaml:7: experiment 't': engine.max_num_batched_tokens: "
                          "engine.max_num_batched_tokens (8) must be >= engine.max_num_seqs (256)"), msg


def test_saved_config_reads_back_strings_that_look_like_yaml_1_2_numbers(exp, tmp_path):
    # '09' and '1e3' are text to YAML 1.1 (PyYAML's dumper) but numbers to the YAML 1.2 loader.
    from sim.yaml_io import dump_yaml, load_value

    data = {"name": "09", "description": "1e3", "x": "-.5", "y": "0o7", "z": "1:00", "n": 1e-5, "i": 10,
            "b": "yes", "c": "off", "t": True}
    text = dump_yaml(data)
    assert load_value(text, "config.yaml") == data
    # and a plain YAML 1.1 reader (yaml.safe_load) too: 'yes' and 'off' are booleans there.
    assert yaml.safe_load(text) == data


@pytest.mark.parametrize(
    "value, message",
    [
        ("9" * 5000, "cannot parse the value as YAML: an integer of 5000 digits is too long"),
        ("[" * 500 + "]" * 500, "the value is nested too deeply"),
        # not an integer under an explicit tag: it said "an integer of 3 digits is too long"
        ("!!int 12a", "cannot parse the value as YAML: expected an integer, got '12a'"),
        ("!!int 0b11", "cannot parse the value as YAML: expected an integer, got '0b11'"),
    ],
)
def test_set_values_python_cannot_read_are_config_errors(value, message):
    with pytest.raises(ConfigError) as info:
        parse_override(f"seed={value}")
    text = str(info.value)
    assert text.startswith("--set seed=") and text.endswith(message) and len(text) < 300


@pytest.mark.parametrize("key", ["rate", "calls_mean", "tool_delay_mean", "docs_tokens", "output_tokens_sigma"])
def test_a_generator_parameter_past_what_a_float_holds_is_one_error_on_it(exp, key):
    """math.isfinite raised OverflowError on 10**400: a traceback, and in a sweep the whole sweep died."""
    big = str(10**400)
    msg = error("t", exp(), [f"workload.params.{key}={big}"])
    assert msg.startswith(f"--set workload.params.{key}={big}: experiment 't': workload.params.{key}: "), msg


def _fitted(tmp_path, **coefficients) -> str:
    base = dict(per_token=0.0, weights_floor=0.0, per_attn_pair=0.0, per_kv_read_token=0.0, per_seq=0.0,
                per_step=0.0)
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"format": "autellix-fitted-latency v2", "coefficients": {**base, **coefficients}}))
    return str(path)


@pytest.mark.parametrize("case", ["constant", "fitted-zero", "fitted-huge", "roofline-units", "roofline-inf"])
def test_a_latency_model_whose_steps_no_gpu_takes_is_refused(exp, tmp_path, case):
    """Each ran: 1e-12 s and an all-zero fit became zero-length steps and latencies of 0 s; a bandwidth
    given in TB/s ran for 10**12 simulated seconds; one of 1e-300 B/s stopped the run with an OverflowError."""
    cases = {  # each builds its own files only when chosen
        "constant": lambda: (["latency.seconds=1e-12"], "latency.seconds", "1e-12"),
        "fitted-zero": lambda: ([f"latency={{kind: fitted, name: {_fitted(tmp_path)}}}"], "latency.name", "0"),
        "fitted-huge": lambda: ([f"latency={{kind: fitted, name: {_fitted(tmp_path, per_step=1e308)}}}"],
                                "latency.name", "1e+308"),
        "roofline-units": lambda: (["latency.kind=roofline",
                                    f"engine.gpu={spec_file(tmp_path, 'gpu', hbm_bandwidth=2.039)}"],
                                   "engine.gpu", "1.13e+10"),
        "roofline-inf": lambda: (["latency.kind=roofline",
                                  f"engine.gpu={spec_file(tmp_path, 'gpu', hbm_bandwidth=1e-300)}"],
                                 "engine.gpu", "inf"),
    }
    overrides, key, seconds = cases[case]()
    msg = error("t", exp(), overrides)
    assert f"experiment 't': {key}: latency model " in msg, msg
    assert msg.endswith(f"gives {seconds} s for a one-token decode; a step must take from 1e-06 to 3600 s "
                        "(check the units of its inputs)"), msg


@pytest.mark.parametrize("pcie, seconds", [(25, "8.39e+04"), (5e-324, "inf")])
def test_a_pcie_bandwidth_no_host_link_has_is_refused_for_a_swap_run(exp, tmp_path, capsys, pcie, seconds):
    """25 (GB/s given as bytes/s) ran to program latencies of 10**8 s; 5e-324 stopped the
    run with an OverflowError, after it had written half its outputs."""
    gpu = spec_file(tmp_path, "gpu", pcie_bandwidth=pcie)
    line = next(i for i, text in enumerate(Path(gpu).read_text().splitlines(), 1) if '"pcie_bandwidth"' in text)
    overrides = [f"engine.gpu={gpu}", "engine.preemption_mode=swap"]
    msg = error("t", exp(), overrides)
    assert msg.startswith(f"--set engine.gpu={gpu}: experiment 't': engine.gpu: {gpu}:{line}: field "
                          f"'pcie_bandwidth': swapping one 16-token KV block of llama-3.1-8b (2,097,152 bytes) at "), msg
    assert f" takes {seconds} s; a block's swap must take from 1e-06 to 3600 s" in msg, msg
    resolve("t", "exp.yaml", overrides[:1])  # recompute never swaps: the field is not read
    args = ["run", "t", "--experiments", "exp.yaml", "--quiet", "--out", "out"]
    assert cli_main([*args, *(a for o in overrides for a in ("--set", o))]) != 0
    assert "'pcie_bandwidth'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_simulate_refuses_a_swap_run_at_such_a_bandwidth_built_in_python(tmp_path):
    from sim.config import ExperimentConfig, LatencyConfig
    from sim.run import run_experiment
    from traces.format import Call, Program

    gpu = spec_file(tmp_path, "gpu", pcie_bandwidth=5e-324)
    cfg = ExperimentConfig("x", engine=EngineConfig(gpu=gpu, preemption_mode="swap"),
                           latency=LatencyConfig(kind="constant", seconds=0.01),
                           workload=WorkloadConfig(generator="bfcl", params={"programs": 2, "rate": 1.0}))
    with pytest.raises(SimulationError, match=r"swapping one 16-token KV block .* takes inf s"):
        simulate([Program("p", 0.0, "x", (Call("a", (), 5, 2),))], cfg, "fcfs")
    with pytest.raises(SimulationError, match=r"takes inf s"):
        run_experiment(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, overrides, origin", [
    ("", ["engine.num_gpu_blocks=1"], "--set engine.num_gpu_blocks=1"),
    ("    engine: {num_gpu_blocks: 1}\n", [], "exp.yaml:6"),
    ("    engine: {num_gpu_blocks: 1}\n", ["workload.params.prompt_tokens_mean=2000"],
     "--set workload.params.prompt_tokens_mean=2000"),
])
def test_a_generated_call_too_large_for_the_cache_names_the_key_set_last(exp, tmp_path, extra, overrides, origin):
    """It named no place at all: only a trace's calls had a line to point at."""
    from sim.run import load_workload, run_experiment

    cfg = resolve("t", exp(base=BASE.replace("    policies: [fcfs]\n", "    policies: [fcfs]\n" + extra)),
                  overrides)
    with pytest.raises(SimulationError) as info:
        run_experiment(cfg, tmp_path / "out", quiet=True)
    assert str(info.value).startswith(f"{origin}: program 'p0' call 'c0': prompt_tokens + output_tokens = "), info.value
    with pytest.raises(SimulationError, match=rf"^{re.escape(origin)}: program 'p0'"):
        simulate(load_workload(cfg), cfg, "fcfs")  # a sweep's point meets it here


def test_num_gpu_blocks_in_the_defaults_keeps_its_own_line_over_the_experiments_workload(exp, tmp_path):
    """The message names engine.num_gpu_blocks, but its place was the experiment's workload line (set
    "later" in the same file); a --set of the workload over it still takes the blame (above)."""
    from sim.run import run_experiment

    base = "defaults:\n  engine: {num_gpu_blocks: 1}\n" + BASE
    cfg = resolve("t", exp(base=base))
    with pytest.raises(SimulationError) as info:
        run_experiment(cfg, tmp_path / "out", quiet=True)
    assert str(info.value).startswith("exp.yaml:2: program 'p0' call 'c0': prompt_tokens + output_tokens = "), info.value
    cfg = resolve("t", exp(base=base), ["workload.params.prompt_tokens_mean=2000"])
    with pytest.raises(SimulationError, match=r"^--set workload.params.prompt_tokens_mean=2000: program 'p0'"):
        run_experiment(cfg, tmp_path / "out", quiet=True)


@pytest.mark.parametrize("key, problem", [
    ("~", "a null key (~, null, or nothing before the colon)"), ("3", "key 3 is an integer"),
    ("true", "key true is a boolean"), ("1.5", "key 1.5 is a number"), ("2020-01-01", "key 2020-01-01 is a date"),
])
def test_a_key_that_is_not_a_string_is_named_as_written_at_its_line(exp, key, problem):
    """`~: 4` under engine read "engine.None: unknown key" and `3: 4` "engine[3]: unknown key"."""
    msg = error("t", exp(base=BASE + f"    engine:\n      replicas: 1\n      {key}: 4\n"))
    assert msg.startswith(f"exp.yaml:8: experiment 't': engine: {problem}, not a key name; valid keys: model, "), msg
    msg = error("t", exp(base=BASE + f"    {key}: 4\n"))
    assert msg.startswith(f"exp.yaml:6: experiment 't': {problem}, not a key name; valid keys: description, "), msg


def test_simulate_refuses_such_a_model_built_in_python():
    from sim.config import ExperimentConfig, LatencyConfig
    from sim.simulate import simulate
    from traces.format import Call, Program

    cfg = ExperimentConfig("x", engine=EngineConfig(), latency=LatencyConfig(kind="constant", seconds=1e-12))
    with pytest.raises(SimulationError, match=r"gives 1e-12 s for a one-token decode; a step must take from 1e-06"):
        simulate([Program("p", 0.0, "x", (Call("a", (), 5, 2),))], cfg, "fcfs")


def test_generator_errors_naming_a_key_as_key_equals_value_are_blamed_where_it_was_set(exp):
    """It fell back to the file line of params, although the value came from --set."""
    assert error("t", exp(), ["workload.params.calls_mean=1e300"]) == (
        "--set workload.params.calls_mean=1e300: experiment 't': workload.params.calls_mean: bfcl parameters: "
        "calls_mean=1e+300 must lie strictly between 1 and calls_max=70")


def test_a_fitted_models_name_nulled_by_set_is_blamed_on_the_set(exp):
    path = exp(base=BASE.replace("latency: {kind: constant, seconds: 0.01}",
                                 "latency: {kind: fitted, name: a100-llama-3.1-8b}"))
    msg = error("t", path, ["latency.name=~"])
    assert msg.startswith("--set latency.name=~: experiment 't': latency.name: 'fitted' needs latency.name: "), msg
    assert error("t", exp(base=BASE.replace("latency: {kind: constant, seconds: 0.01}", "latency: {kind: fitted}"))
                 ).startswith("exp.yaml:4: experiment 't': latency.kind: 'fitted' needs latency.name")


@pytest.mark.parametrize("prompt, sets, message", [
    # Past Llama-3.1's context: vLLM refuses it, whatever the KV cache holds (450,896 tokens here).
    (131_057, [], "prompt_tokens + output_tokens = 131073 exceeds the context of llama-3.1-8b (131072 tokens, "
                  "engine.max_model_len unset); vLLM refuses a longer request"),
    (4_081, ["engine.max_model_len=4096"], "prompt_tokens + output_tokens = 4097 exceeds engine.max_model_len=4096; "
                                           "vLLM refuses a longer request"),
    (100_000, ["engine.num_gpu_blocks=5000"], "prompt_tokens + output_tokens = 100016 exceeds the KV cache of one "
                                              "replica (80000 tokens)"),
])
def test_a_call_from_a_trace_too_big_for_the_engine_names_its_line(exp, tmp_path, prompt, sets, message):
    from traces.format import Call, Program
    from traces.io import save

    save([Program("a", 0.0, "x", (Call("c0", (), 5, 2),)), Program("p0", 0.0, "x", (Call("c0", (), prompt, 16),))],
         tmp_path / "big.jsonl")
    from sim.experiments import resolve
    from sim.run import load_workload
    from sim.simulate import check_workload

    cfg = resolve("t", exp(), ["workload.trace=big.jsonl", *sets])
    with pytest.raises(SimulationError) as info:
        check_workload(load_workload(cfg), cfg)
    assert str(info.value).startswith(f"big.jsonl:2: program 'p0' call 'c0': {message}")


@pytest.mark.parametrize("engine, sets, blamed, message", [
    # The limit's own line, over the workload's in the same file (exp.yaml:3). (A budget that cannot cover a
    # prompt without chunking is refused with the experiment: test_a_budget_below_the_context_without_chunking...)
    ("{max_model_len: 300}", [], "exp.yaml:6", "exceeds engine.max_model_len=300; vLLM refuses a longer request"),
    ("{max_model_len: 300}", ["workload.params.programs=10"], "--set workload.params.programs=10",
     "exceeds engine.max_model_len=300"),
    ("", ["engine.max_model_len=300"], "--set engine.max_model_len=300", "exceeds engine.max_model_len=300"),
    ("{num_gpu_blocks: 20}", ["engine.max_model_len=300"], "--set engine.max_model_len=300",
     "exceeds engine.max_model_len=300"),
    ("{num_gpu_blocks: 20}", [], "exp.yaml:6", "exceeds the KV cache of one replica (320 tokens)"),
])
def test_a_generated_call_too_big_for_the_engine_blames_the_limit_set_last(exp, engine, sets, blamed, message):
    from sim.experiments import resolve
    from sim.run import load_workload
    from sim.simulate import check_workload

    cfg = resolve("t", exp(base=with_engine(engine)), sets)
    with pytest.raises(SimulationError) as info:
        check_workload(load_workload(cfg), cfg)
    assert str(info.value).startswith(f"{blamed}"), str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("sets, message", [
    (["engine.max_model_len=131073"], "--set engine.max_model_len=131073: experiment 't': engine.max_model_len: "
     "expected at most llama-3.1-8b's context (max_position_embeddings: 131072), as vLLM requires, got 131073"),
    (["engine.max_model_len=0"], "--set engine.max_model_len=0: experiment 't': engine.max_model_len: expected null "
     "or an integer >= 1, got 0"),
    # vLLM does not start unless one call of max_model_len fits the KV cache the memory leaves.
    (["engine.gpu_memory_utilization=0.25"], "--set engine.gpu_memory_utilization=0.25: experiment 't': "
     "engine.gpu_memory_utilization: the model's context (max_position_embeddings of llama-3.1-8b) is 131072 "
     "tokens, but the KV cache left after the weights holds 24912 tokens, and vLLM refuses to start unless one "
     "call of max_model_len fits; set engine.max_model_len to at most 24912, or give the KV cache more memory "
     "(engine.gpu_memory_utilization, engine.gpus_per_replica)"),
    (["engine.gpu_memory_utilization=0.25", "engine.max_model_len=30000"], "--set engine.max_model_len=30000: "
     "experiment 't': engine.max_model_len: engine.max_model_len is 30000 tokens, but the KV cache left after "
     "the weights holds 24912 tokens"),
])
def test_max_model_len_is_checked_as_vllm_checks_it(exp, sets, message):
    assert error("t", exp(), sets).startswith(message)
    resolve("t", exp(), ["engine.gpu_memory_utilization=0.25", "engine.max_model_len=24912"])  # fits: starts


@pytest.mark.parametrize("base, overrides, message", [
    # no location at all
    ("experiments:\n  t: {}\n", [], "exp.yaml:2: experiment 't': workload: missing; give either generator (with "
     "params) or trace"),
    # Python's own "keywords must be strings"
    (BASE.replace("rate: 5.0}", "rate: 5.0, 3: 4}"), [], "exp.yaml:3: experiment 't': workload.params: key 3: "
     "expected a parameter name (a string)"),
    # "no such file: /dev/null"
    (BASE, ["workload.trace=/dev/null"], "--set workload.trace=/dev/null: experiment 't': workload.trace: /dev/null "
     "is not a regular file (a device or a pipe), expected a trace file"),
])
def test_experiment_mistakes_that_read_oddly_or_named_no_line(exp, base, overrides, message):
    assert error("t", exp(base=base), overrides) == message


@pytest.mark.parametrize("overrides, key, engine", [
    (["engine.model=llama-3.1-70b", "engine.gpus_per_replica=4"], "engine.model", "llama-3.1-70b on 4 x a100-80gb"),
    (["engine.gpu=h100"], "engine.gpu", "llama-3.1-8b on 1 x h100"),
])
def test_a_fitted_model_timing_another_engine_is_refused(exp, overrides, key, engine):
    """The 8B-on-A100 fit timed a 70B over four GPUs (19 ms for a 64-sequence decode) without a word."""
    path = exp(base=BASE.replace("latency: {kind: constant, seconds: 0.01}",
                                 "latency: {kind: fitted, name: a100-llama-3.1-8b}"))
    assert error("t", path, overrides).endswith(
        f"experiment 't': {key}: 'a100-llama-3.1-8b' was fitted to llama-3.1-8b on 1 x a100-80gb, not this "
        f"engine's {engine}; fit one to a profile of this engine (python -m sim fit-latency), or use "
        "latency.kind roofline")
    resolve("t", path, ["engine.gpu=h100", "latency.name=h100-llama-3.1-8b-est"])  # its own GPU: fine


def test_an_empty_section_is_refused_not_taken_for_the_defaults(exp):
    """``engine:`` with nothing under it (or --set latency=null) is null, and it replaced the defaults'
    whole mapping: replicas fell from 2 to 1, and the fitted model became the roofline, without a word."""
    path = exp(base="defaults:\n  engine: {max_num_seqs: 64, replicas: 2}\n" + BASE + "    engine:\n      # nothing\n")
    assert error("t", path).startswith("exp.yaml:8: experiment 't': engine: expected a mapping with keys model, ")
    assert error("t", path).endswith("got null (a section with nothing under it); remove it, or give it keys")
    msg = error("t", exp(), ["latency=null"])
    assert msg.startswith("--set latency=null: experiment 't': latency: expected a mapping with keys kind, "), msg


@pytest.mark.parametrize("overrides, key, kind, other", [
    (["latency.step_overhead=0.5"], "step_overhead", "constant", "roofline"),
    (["latency.name=a100-llama-3.1-8b"], "name", "constant", "fitted"),
    (["latency.kind=fitted", "latency.name=a100-llama-3.1-8b", "latency.seconds=0.5"], "seconds", "fitted", "constant"),
])
def test_a_latency_field_the_kind_does_not_use_is_refused(exp, overrides, key, kind, other):
    """It was ignored: --set latency.step_overhead=0.5 under the constant kind gave the same latencies."""
    assert error("t", exp(), overrides) == (
        f"--set latency.{key}={overrides[-1].split('=', 1)[1]}: experiment 't': latency.{key}: the {kind} kind does "
        f"not use it (the {other} kind does); set latency.kind={other}, or drop it")


def test_switching_the_kind_leaves_the_fields_set_below_it(exp):
    """The file's constant seconds under a --set latency.kind=roofline is the kind switched away from."""
    cfg = resolve("t", exp(), ["latency.kind=roofline"])
    assert cfg.latency.kind == "roofline"
    assert cfg.latency.seconds == 0.02  # the constant's 0.01 it ignores is not in the resolved config
    # ... whose file reruns: a field the kind ignores, written there, would be refused as set beside the kind
    from sim.experiments import to_file_dict
    from sim.yaml_io import dump_yaml

    Path("resolved.yaml").write_text(dump_yaml(to_file_dict(cfg)))
    assert resolve("t", "resolved.yaml", []) == cfg
    path = exp(base=BASE.replace("latency: {kind: constant, seconds: 0.01}", "latency: {kind: roofline, name: null}"))
    assert resolve("t", path, []).latency.name is None  # null is no value: nothing ignored


def test_num_gpu_blocks_still_needs_the_weights_and_the_blocks_to_fit(exp):
    """It skipped the memory arithmetic: 70B on one A100 ran, and so did 10 million blocks (20 TB of KV)."""
    msg = error("t", exp(), ["engine.model=llama-3.1-70b", "engine.gpus_per_replica=1", "engine.num_gpu_blocks=5000"])
    assert "engine.model: llama-3.1-70b does not fit on engine.gpus_per_replica=1 x a100-80gb" in msg, msg
    assert error("t", exp(), ["engine.num_gpu_blocks=10000000"]) == (
        "--set engine.num_gpu_blocks=10000000: experiment 't': engine.num_gpu_blocks: 10000000 blocks of 16 tokens "
        "need 2.097e+04 GB of KV cache, more than the 59.1 GB left after the weights; at most 28181 fit")
    assert resolve("t", exp(), ["engine.num_gpu_blocks=28181"]).engine.num_gpu_blocks == 28181


TRACE_BASE = """\
defaults:
  seed: 4
experiments:
  t:
    workload: {trace: tiny.jsonl}
    latency: {kind: constant, seconds: 0.01}
    policies: [fcfs]
"""


@pytest.fixture
def trace_exp(exp, tmp_path):
    """An experiment replaying a one-program trace, under defaults that set a seed."""
    from traces.format import Call, Program
    from traces.io import save

    save([Program("a", 0.0, "x", (Call("c0", (), 5, 2),))], tmp_path / "tiny.jsonl")
    return lambda extra="": exp(base=TRACE_BASE.replace("policies: [fcfs]\n", "policies: [fcfs]\n" + extra))


@pytest.mark.parametrize("extra, overrides, message", [
    ("", ["workload.params=false"], "--set workload.params=false: experiment 't': workload.params: params apply "
     "to a generator, not to a trace file; got false"),
    ("", ["workload.params=0"], "--set workload.params=0: experiment 't': workload.params: params apply to a "
     "generator, not to a trace file; got 0"),
    ("", ["workload.params={programs: 5}"], "--set workload.params={programs: 5}: experiment 't': workload.params: "
     "params apply to a generator, not to a trace file; got a mapping"),
    ("    seed: 2\n", [], "exp.yaml:8: experiment 't': seed: the trace file tiny.jsonl does not depend on the seed "
     "(only a generator's draw does); drop it, or use workload.generator"),
    ("", ["seed=1"], "--set seed=1: experiment 't': seed: the trace file tiny.jsonl does not depend on the seed "
     "(only a generator's draw does); drop it, or use workload.generator"),
])
def test_what_a_trace_workload_would_ignore_is_refused(trace_exp, extra, overrides, message):
    """`params: false` and a seed beside a trace were accepted and changed nothing: a sweep over seeds
    of a trace experiment ran the same programs five times and reported them as replications."""
    assert error("t", trace_exp(extra), overrides) == message


def test_a_trace_keeps_the_seeds_it_does_not_own(trace_exp):
    """The defaults' seed (below the layer that chose the trace), seed 0 and an empty params pass; the
    resolved config resets the unused seed, so its file reruns."""
    from sim.experiments import to_file_dict
    from sim.yaml_io import dump_yaml

    cfg = resolve("t", trace_exp())
    assert cfg.seed == 0
    Path("config.yaml").write_text(dump_yaml(to_file_dict(cfg)))
    assert to_file_dict(resolve("t", "config.yaml")) == to_file_dict(cfg)  # the trace's path made absolute
    assert resolve("t", trace_exp("    seed: 0\n"), ["workload.params={}"]).seed == 0
    # A --set trace over a generator experiment drops the generator's params and outranks the file's seed.
    assert resolve("t", trace_exp(), ["workload.trace=tiny.jsonl"]).workload.trace == "tiny.jsonl"


@pytest.mark.parametrize("key", ["num_gpu_blocks", "block_size", "activation_reserve_bytes", "max_num_seqs",
                                 "replicas", "gpus_per_replica"])
def test_an_integer_past_what_a_float_holds_is_a_located_error(exp, key):
    """The memory arithmetic runs in floats: 1 with 400 zeros raised OverflowError (a traceback)."""
    big = "1" + "0" * 400
    msg = error("t", exp(), [f"engine.{key}={big}"])
    assert msg.endswith(f"experiment 't': engine.{key}: expected at most 2**53 (9,007,199,254,740,992), "
                        f"got an integer of 401 digits"), msg
    assert error("t", exp(), [f"engine.{key}={2**53 + 1}"]).endswith(
        f"engine.{key}: expected at most 2**53 (9,007,199,254,740,992), got {2**53 + 1}")


def test_gpus_per_replica_unset_follows_the_models_tensor_parallel(tmp_path, monkeypatch):
    """The spec's tensor_parallel (70B: 4, as the paper serves it) was required and never read:
    an experiment naming only the model ran 70B on one GPU, where it does not fit."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "e.yaml").write_text(textwrap.dedent("""\
        experiments:
          big:
            workload: {generator: bfcl, params: {programs: 3, rate: 1.0}}
            engine: {model: llama-3.1-70b}
            latency: {kind: roofline}
          small:
            workload: {generator: bfcl, params: {programs: 3, rate: 1.0}}
            latency: {kind: roofline}
        """))
    assert resolve("big", "e.yaml", []).engine.gpus_per_replica == 4
    assert resolve("small", "e.yaml", []).engine.gpus_per_replica == 1
    assert resolve("big", "e.yaml", ["engine.gpus_per_replica=8"]).engine.gpus_per_replica == 8  # set wins
    assert resolve("small", "e.yaml", ["engine.model=llama-3.1-70b"]).engine.gpus_per_replica == 4


def test_generator_parameters_wrong_together_blame_the_one_set_last(exp):
    """calls_mean in the file, calls_max by --set: the first named (calls_mean, the file's line) was blamed."""
    path = exp(base=BASE.replace("workload: {generator: bfcl, params: {programs: 5, rate: 5.0}}",
                                 "workload: {generator: sharegpt, params: {programs: 5, rate: 5.0, calls_mean: 6.0}}"))
    assert error("t", path, ["workload.params.calls_max=2"]) == (
        "--set workload.params.calls_max=2: experiment 't': workload.params.calls_max: sharegpt parameters: "
        "calls_mean=6.0 must lie strictly between 1 and calls_max=2")
    # both in the file: the first the message names
    path = exp(base=BASE.replace("workload: {generator: bfcl, params: {programs: 5, rate: 5.0}}",
                                 "workload: {generator: sharegpt, params: {programs: 5, rate: 5.0, calls_max: 2, "
                                 "calls_mean: 6.0}}"))
    assert error("t", path).startswith("exp.yaml:3: experiment 't': workload.params.calls_mean: sharegpt parameters")


def test_a_quoted_parameter_is_blamed_not_the_ones_that_bound_it(exp):
    """LATS names 'calls_mean' and, unquoted, the width=3 and max_steps=5 that bound it: the
    rule for parameters wrong together blamed width (the file's line) for a --set calls_mean."""
    path = exp(base=BASE.replace("workload: {generator: bfcl, params: {programs: 5, rate: 5.0}}",
                                 "workload: {generator: lats, params: {programs: 5, rate: 5.0, width: 3, max_steps: 5}}"))
    assert error("t", path, ["workload.params.calls_mean=1000"]).startswith(
        "--set workload.params.calls_mean=1000: experiment 't': workload.params.calls_mean: lats parameter 'calls_mean'")


def test_a_set_of_the_parameter_that_bounds_the_quoted_one_is_blamed(exp):
    """A --set width made the file's calls_mean impossible: the quoted calls_mean (the file's line) was blamed."""
    path = exp(base=BASE.replace("workload: {generator: bfcl, params: {programs: 5, rate: 5.0}}",
                                 "workload: {generator: lats, params: {programs: 5, rate: 5.0, calls_mean: 20, "
                                 "max_steps: 5}}"))
    assert error("t", path, ["workload.params.width=1"]).startswith(
        "--set workload.params.width=1: experiment 't': workload.params.width: lats parameter 'calls_mean'")
    # all in the file: the quoted one
    path = exp(base=BASE.replace("workload: {generator: bfcl, params: {programs: 5, rate: 5.0}}",
                                 "workload: {generator: lats, params: {programs: 5, rate: 5.0, calls_mean: 100, "
                                 "width: 2, max_steps: 5}}"))
    assert error("t", path).startswith("exp.yaml:3: experiment 't': workload.params.calls_mean: lats parameter")


def test_readme_lists_every_spec_field():
    """README's "Your own model or GPU" is what a user writes a spec from: a field added to
    ModelSpec (max_position_embeddings was) and not listed there is a refusal they cannot fix."""
    from dataclasses import fields

    from sim.hardware import GPUSpec, ModelSpec

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("**Your own model or GPU**"):readme.index("## Running experiments")]
    model_part, gpu_part = section.split("A GPU spec needs")
    for spec, part in ((ModelSpec, model_part), (GPUSpec, gpu_part)):
        listed = set(re.findall(r"`(\w+)`", part))
        assert {f.name for f in fields(spec)} <= listed, spec
