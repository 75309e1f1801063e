"""The scheduler plugin's configuration and request tags (no vLLM needed)."""

import re
import subprocess
import sys

import pytest

from engine.plugin_config import PluginConfigError, engine_policies, parse_plugin_config, read_tags
from sim.core import PolicyParams


def test_missing_section_means_plas_with_default_params():
    for raw in (None, {}, {"other": 1}):
        cfg = parse_plugin_config(raw)
        assert cfg.policy == "plas" and cfg.params == PolicyParams()


def test_policy_and_params_are_read():
    cfg = parse_plugin_config({"autellix": {"policy": "atlas", "params": {"beta": 4, "num_queues": 3}}})
    assert cfg.policy == "atlas"
    assert cfg.params == PolicyParams(beta=4, num_queues=3)
    # A JSON string, as a shell may pass it, is accepted too.
    assert parse_plugin_config({"autellix": '{"policy": "mlfq"}'}).policy == "mlfq"


def test_engine_policies_exclude_the_oracle():
    assert engine_policies() == ["fcfs", "mlfq", "plas", "atlas", "program_fcfs"]


def test_srpt_is_refused_as_an_oracle():
    with pytest.raises(PluginConfigError, match=r"'srpt' is an oracle.*only in the simulator.*fcfs, mlfq, plas, atlas, program_fcfs"):
        parse_plugin_config({"autellix": {"policy": "srpt"}})


def test_unknown_policy_names_valid_choices():
    with pytest.raises(PluginConfigError, match=r"unknown policy 'lifo'; valid choices: fcfs, mlfq, plas, atlas, program_fcfs$"):
        parse_plugin_config({"autellix": {"policy": "lifo"}})


def test_bad_params_name_the_key():
    with pytest.raises(PluginConfigError, match=r"unknown keys \['betta'\]; valid keys: num_queues"):
        parse_plugin_config({"autellix": {"params": {"betta": 2}}})
    with pytest.raises(PluginConfigError, match=r"params: policy_params.beta: expected > 0 and finite, got -1"):
        parse_plugin_config({"autellix": {"params": {"beta": -1}}})
    with pytest.raises(PluginConfigError, match=r"unknown keys \['polcy'\]"):
        parse_plugin_config({"autellix": {"polcy": "plas"}})


@pytest.mark.parametrize(
    "key, text, got",
    [("quantum", "true", "True"), ("beta", '"2"', "'2'"), ("queue_base", "[1]", "[1]"),
     ("num_queues", "4.0", "4.0"), ("locality_threshold", "false", "False"), ("preempt_limit", "true", "True"),
     ("program_ttl", "9" * 5000, "a 5000-digit integer")],
    ids=lambda v: v if len(v) < 20 else f"{len(v)} chars",
)
def test_params_of_the_wrong_type_are_refused_not_coerced(key, text, got):
    # JSON from a shell: true would pass a range check as the number 1, a string would fail a comparison.
    with pytest.raises(PluginConfigError, match=rf"params: policy_params.{key}: expected .*, got {re.escape(got)}$"):
        parse_plugin_config({"autellix": '{"params": {"%s": %s}}' % (key, text)})


def test_tags_default_to_a_single_call_program():
    t = read_tags("req-7", None)
    assert (t.program_id, t.thread_id, t.program_service) == ("req-7", "req-7", None)
    t = read_tags("req-8", {"program_id": "P", "program_service": 2})
    assert (t.program_id, t.thread_id, t.program_service, t.total_service) == ("P", "req-8", 2.0, None)
    assert read_tags("req-8", {"program_total_service": 3}).total_service == 3.0
    t = read_tags("req-9", {"program_id": 5, "thread_id": "t1"})
    assert (t.program_id, t.thread_id, t.kv_ttl) == ("5", "t1", 0.0)
    assert read_tags("req-10", {"kv_ttl": 2}).kv_ttl == 2.0
    assert read_tags("req-11", {"kv_ttl": None}).kv_ttl == 0.0


@pytest.mark.parametrize(
    "extra, msg",
    [
        ({"program_id": ["x"]}, "program_id must be a string"),
        ({"thread_id": 1.5}, "thread_id must be a string"),
        ({"program_service": -1}, "program_service must be a finite number of seconds >= 0"),
        ({"program_service": "3"}, "program_service must be a finite number of seconds >= 0"),
        ({"program_service": float("nan")}, "program_service must be a finite number of seconds >= 0"),
        ({"program_total_service": -2}, r"request 'r': extra_args.program_total_service must be a finite number "
                                        r"of seconds >= 0, got -2$"),
        ({"kv_ttl": -0.5}, r"request 'r': extra_args.kv_ttl must be a finite number of seconds >= 0, got -0.5$"),
        ({"kv_ttl": "2"}, "kv_ttl must be a finite number of seconds >= 0, got '2'"),
        ({"kv_ttl": True}, "kv_ttl must be a finite number of seconds >= 0, got True"),
        ({"kv_ttl": float("inf")}, "kv_ttl must be a finite number of seconds >= 0, got inf"),
        ({"kv_ttl": 1e300}, r"request 'r': extra_args.kv_ttl must be at most 1e\+09 seconds, got 1e\+300$"),
        # integers too large for a float or for str(): a clear error, not OverflowError/ValueError
        ({"program_service": 10**400}, "program_service must be a finite number of seconds >= 0, got an integer "
                                       "of 1329 bits"),
        ({"kv_ttl": -(10**400)}, "kv_ttl must be a finite number of seconds >= 0, got an integer of 1329 bits"),
        ({"program_id": 10**5000}, "program_id must be a string, got an integer of 16610 bits"),
        ({"thread_id": ["x" * 200]}, r"thread_id must be a string, got \['xxxx[x]*\.\.\.$"),
    ],
)
def test_malformed_tags_are_named(extra, msg):
    with pytest.raises(PluginConfigError, match=msg):
        read_tags("r", extra)


def test_engine_package_and_plugin_config_do_not_import_vllm():
    code = "import sys, engine, engine.plugin_config\nprint(sorted(m for m in sys.modules if m.split('.')[0] in {'vllm', 'torch'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
