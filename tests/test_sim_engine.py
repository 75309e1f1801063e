"""The simulated engine: hand-computed timelines, invariants, policy behaviour."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.config import EngineConfig, ExperimentConfig, LatencyConfig
from sim.core import POLICY_CLASSES
from sim.core.params import PolicyParams
from sim.latency.fitted import FittedLatency
from sim.lazy_decode import quantize
from sim.simulate import SimulationError, simulate
from traces.format import Call, Program, SharedPrefix


def cfg(policy_params=None, latency=1.0, **engine) -> ExperimentConfig:
    base = dict(num_gpu_blocks=1000, max_num_seqs=1, max_num_batched_tokens=1000, enable_prefix_caching=False)
    base.update(engine)
    return ExperimentConfig(
        "test",
        engine=EngineConfig(**base),
        latency=LatencyConfig(kind="constant", seconds=latency),
        policy_params=policy_params or PolicyParams(),
    )


def call(cid, prompt, out, parents=(), delay=0.0, **kw):
    return Call(cid, tuple(parents), prompt, out, delay, **kw)


def prog(pid, arrival, *calls, workload="test"):
    return Program(pid, arrival, workload, tuple(calls))


def by_id(result):
    return {(r.program_id, r.call_id): r for r in result.calls}


# ---------------------------------------------------------------- hand-computed cases
def test_fcfs_one_seq_constant_latency_matches_hand_timeline():
    # One sequence at a time, 1 s per step. A call takes one step per output
    # token: the prefill step yields the first token.
    programs = [
        prog("A", 0.0, call("a", 100, 3)),
        prog("B", 0.5, call("b", 50, 2)),
        prog("C", 1.0, call("c0", 20, 2), call("c1", 30, 1, parents=["c0"], delay=1.5)),
    ]
    r = simulate(programs, cfg(), "fcfs")
    rec = by_id(r)
    a, b, c0, c1 = rec["A", "a"], rec["B", "b"], rec["C", "c0"], rec["C", "c1"]
    assert (a.first_scheduled, a.first_token, a.finish) == (0.0, 1.0, 3.0)
    assert (b.first_scheduled, b.first_token, b.finish) == (3.0, 4.0, 5.0)
    assert (c0.first_scheduled, c0.finish) == (5.0, 7.0)
    assert (c1.arrival, c1.first_scheduled, c1.finish) == (8.5, 8.5, 9.5)
    assert b.waiting == pytest.approx(2.5) and c0.waiting == pytest.approx(4.0)
    assert a.service == 3.0 and c1.service == 1.0
    progs = {p.program_id: p for p in r.programs}
    assert progs["A"].latency == 3.0 and progs["B"].latency == 4.5 and progs["C"].latency == 8.5
    assert progs["C"].normalized_latency == pytest.approx(8.5 / 3)
    assert progs["B"].waiting_share == pytest.approx(2.5 / 4.5)


# Async scheduling (vLLM's default under `vllm serve`): step N+1 is scheduled
# when step N starts. The timelines below are worked out from vLLM 0.26.0's
# EngineCore.step_with_batch_queue and AsyncScheduler, 1 s per step.
def _async(**engine):
    return cfg(**engine, async_scheduling=True)


def test_async_a_call_arriving_during_a_step_is_first_computed_two_steps_later():
    # A runs steps [0,1) .. [3,4). B arrives at 1.5, during step [1,2): the
    # step [2,3) was scheduled at t=1, before B arrived, so B starts at 3
    # (synchronously at 2). C arrives at an idle engine and starts at once.
    programs = [
        prog("A", 0.0, call("a", 100, 4)),
        prog("B", 1.5, call("b", 50, 2)),
        prog("C", 10.0, call("c", 50, 1)),
    ]
    sync = by_id(simulate(programs, cfg(max_num_seqs=2), "fcfs"))
    both = by_id(simulate(programs, _async(max_num_seqs=2), "fcfs"))
    assert (sync["B", "b"].first_scheduled, sync["B", "b"].finish) == (2.0, 4.0)
    assert (both["B", "b"].first_scheduled, both["B", "b"].first_token, both["B", "b"].finish) == (3.0, 4.0, 5.0)
    for r in (sync, both):
        assert r["A", "a"].finish == 4.0
        assert (r["C", "c"].first_scheduled, r["C", "c"].finish) == (10.0, 11.0)


@pytest.mark.parametrize("binding", ["seats", "kv"])
def test_async_a_finished_call_holds_its_slot_and_kv_for_one_more_step(binding):
    # A and C run from t=0; A's last token comes in step [1,2). B (arrived at
    # 0.5) fits only once A is gone: synchronously it starts at 2. Async,
    # step [2,3) was scheduled at t=1 while A still held its seat (or its 7
    # KV blocks: with 10 blocks, A's 7 and C's 2 leave B's 4 no room), so B
    # starts at 3. C keeps running throughout.
    limits = dict(max_num_seqs=2) if binding == "seats" else dict(max_num_seqs=4, num_gpu_blocks=10)
    programs = [
        prog("A", 0.0, call("a", 100, 2)),
        prog("C", 0.0, call("c", 20, 6)),
        prog("B", 0.5, call("b", 50, 1)),
    ]
    sync = by_id(simulate(programs, cfg(**limits), "fcfs"))
    both = by_id(simulate(programs, _async(**limits), "fcfs"))
    assert (sync["B", "b"].first_scheduled, sync["B", "b"].finish) == (2.0, 3.0)
    assert (both["B", "b"].first_scheduled, both["B", "b"].finish) == (3.0, 4.0)
    for r in (sync, both):
        assert r["A", "a"].finish == 2.0 and r["C", "c"].finish == 6.0


def test_async_an_engine_whose_calls_all_finished_schedules_the_next_at_once():
    # One seat. A finishes in step [1,2); B waits for the seat (arrived at
    # 0.5) and D arrives during step [1,2). The step scheduled at t=1 is empty
    # (A ends in step [1,2) and holds the seat), so vLLM schedules again at
    # t=2 with A's outputs applied: B starts at 2, as it does synchronously.
    programs = [
        prog("A", 0.0, call("a", 100, 2)),
        prog("B", 0.5, call("b", 50, 1)),
        prog("D", 1.5, call("d", 50, 1)),
    ]
    for config in (cfg(), _async()):
        r = by_id(simulate(programs, config, "fcfs"))
        assert (r["B", "b"].first_scheduled, r["D", "d"].first_scheduled) == (2.0, 3.0)
    # Four seats, 10 KV blocks: B (4 blocks) waits for A's 7. The step
    # scheduled at t=1 is again empty, so the one scheduled at t=2 sees D
    # too, although D arrived after t=1: B and D both start at 2.
    r = by_id(simulate(programs, _async(max_num_seqs=4, num_gpu_blocks=10), "fcfs"))
    assert (r["B", "b"].first_scheduled, r["D", "d"].first_scheduled) == (2.0, 2.0)
    # Two seats: the step scheduled at t=1 holds B (arrived during step
    # [0,1), so at 2 where synchronously at 1) and D, arrived during [1,2),
    # waits for the step scheduled at t=2.
    for config, starts in ((cfg(max_num_seqs=2), (1.0, 2.0)), (_async(max_num_seqs=2), (2.0, 3.0))):
        r = by_id(simulate(programs, config, "fcfs"))
        assert (r["B", "b"].first_scheduled, r["D", "d"].first_scheduled) == starts


@pytest.mark.parametrize("fast_forward", [True, False])
def test_async_the_core_sees_a_steps_service_only_after_the_next_schedule(fast_forward):
    # PLAS, a 2 s first quantum, one sequence. A runs from t=0; B arrives
    # at 0.5. Sync: A's second step (ending t=2) uses up its quantum, so
    # the schedule at t=2 finds A demoted and lets B in. Async: vLLM
    # schedules the step at t=2 before it processes the output of the step
    # ending then, and our plugin charges that step only then; so A is
    # demoted one schedule later and B starts at t=3, as in vLLM.
    programs = [prog("A", 0.0, call("a", 10, 10)), prog("B", 0.5, call("b", 10, 2))]
    params = PolicyParams(beta=1e9, queue_base=2.0)
    for config, b_start in ((cfg(params, fast_forward=fast_forward), 2.0),
                            (cfg(params, fast_forward=fast_forward, async_scheduling=True), 3.0)):
        rec = by_id(simulate(programs, config, "plas"))
        assert (rec["B", "b"].first_scheduled, rec["B", "b"].finish) == (b_start, b_start + 2.0)
        assert rec["A", "a"].preemptions == 1


def test_memory_preemption_evicts_the_worst_ranked_running_call_not_yet_scheduled():
    """FCFS, 4 blocks, three 16-token prompts: at t=2 B's decode needs a second block and none is free.

    t=0 A prefills (1 block). t=1 A grows to 2 blocks; B and C are admitted
    (1 block each, 4 in use). t=2 A fits; B needs a block: the victim is C,
    the latest arrival and the worst key among those not yet scheduled this
    step, not B itself (nothing is admitted in a step that preempted for
    memory). C, 17 tokens (2 blocks with its sampled token), waits for A's
    blocks at t=6, recomputes them in one step (token 2 at t=7), and decodes
    its last four tokens by t=11.
    """
    programs = [prog("A", 0.0, call("a", 16, 6)), prog("B", 0.1, call("b", 16, 6)), prog("C", 0.2, call("c", 16, 6))]
    r = by_id(simulate(programs, cfg(num_gpu_blocks=4, max_num_seqs=3), "fcfs"))
    got = {k[0]: (v.first_scheduled, v.first_token, v.finish, v.preemptions) for k, v in r.items()}
    assert got == {"A": (0.0, 1.0, 6.0, 0), "B": (1.0, 2.0, 7.0, 0), "C": (1.0, 2.0, 11.0, 1)}


def test_async_a_call_whose_last_token_is_in_flight_is_the_memory_victim():
    # 4 blocks of 16. A (31 + 6 tokens) and B (16 + 2) start together. B
    # samples its last token in step [1,2); scheduling step [2,3), A needs
    # a third block while B still holds its two. vLLM's memory victim is the
    # worst running request, B, whose last token is in flight: evicting it
    # costs nothing. A must not be preempted and recomputed. (Checked
    # against vLLM 0.26.0's AsyncScheduler driven on CPU.)
    programs = [prog("A", 0.0, call("a", 31, 6)), prog("B", 0.0, call("b", 16, 2))]
    for config in (cfg(num_gpu_blocks=4, max_num_seqs=2), _async(num_gpu_blocks=4, max_num_seqs=2)):
        r = simulate(programs, config, "fcfs")
        rec = by_id(r)
        assert (rec["A", "a"].finish, rec["A", "a"].preemptions) == (6.0, 0)
        assert (rec["B", "b"].finish, rec["B", "b"].preemptions) == (2.0, 0)
        assert r.stats["prefill_tokens"] == 47 and r.stats["preemptions"] == 0


# Host time under async scheduling: a fitted model whose every step takes 1 s,
# of which ``host`` seconds are CPU work. vLLM schedules step N+1 while step
# N runs on the GPU, so a step that follows another back to back takes
# max(1 - host, host); the first step after an idle engine, or after a
# schedule that had to wait for the last outputs, pays its host time in full.
def _host_cfg(tmp_path, host, **engine):
    path = tmp_path / "host.json"
    model = FittedLatency(0.0, 0.0, 0.0, 0.0, 0.0, 1.0, name="host", host_per_step=host)
    path.write_text(json.dumps(model.to_json()))
    config = cfg(**engine)
    return dataclasses.replace(config, latency=LatencyConfig(kind="fitted", name=str(path)))


@pytest.mark.parametrize("fast_forward", [True, False])
@pytest.mark.parametrize(("host", "steady"), [(0.25, 0.75), (0.5, 0.5), (0.75, 0.75)])
def test_async_overlaps_host_time_of_back_to_back_steps(tmp_path, host, steady, fast_forward):
    # A: one full step [0,1) from an idle engine, then three back to back.
    # C arrives at an idle engine at 10: full again, then one overlapped.
    programs = [prog("A", 0.0, call("a", 100, 4)), prog("C", 10.0, call("c", 50, 2))]
    both = by_id(simulate(programs, _host_cfg(tmp_path, host, async_scheduling=True, fast_forward=fast_forward),
                          "fcfs"))
    assert (both["A", "a"].first_token, both["A", "a"].finish) == (1.0, 1.0 + 3 * steady)
    assert both["A", "a"].service == 1.0 + 3 * steady
    assert (both["C", "c"].first_token, both["C", "c"].finish) == (11.0, 11.0 + steady)
    sync = by_id(simulate(programs, _host_cfg(tmp_path, host, fast_forward=fast_forward), "fcfs"))
    assert (sync["A", "a"].finish, sync["C", "c"].finish) == (4.0, 12.0)  # sync pays host time every step


@pytest.mark.parametrize("fast_forward", [True, False])
def test_async_a_step_scheduled_after_waiting_for_outputs_pays_its_host_time(tmp_path, fast_forward):
    # One seat, 0.25 s of host time. A: [0,1) full, [1,1.75) overlapped;
    # A holds the seat until its output is processed, so the step scheduled
    # during [1,1.75) is empty and vLLM schedules again at 1.75 with A's
    # output applied: B's step [1.75,2.75) had nothing to overlap with. So
    # does D's [2.75,3.75) after B, for the same reason.
    programs = [
        prog("A", 0.0, call("a", 100, 2)),
        prog("B", 0.5, call("b", 50, 1)),
        prog("D", 1.5, call("d", 50, 2)),
    ]
    r = by_id(simulate(programs, _host_cfg(tmp_path, 0.25, async_scheduling=True, fast_forward=fast_forward), "fcfs"))
    assert r["A", "a"].finish == 1.75
    assert (r["B", "b"].first_scheduled, r["B", "b"].finish) == (1.75, 2.75)
    assert (r["D", "d"].first_scheduled, r["D", "d"].first_token, r["D", "d"].finish) == (2.75, 3.75, 4.5)


def test_chunked_prefill_splits_prompt_over_the_budget():
    # Budget 64: a 100-token prompt takes chunks of 64 and 36, then decodes.
    r = simulate([prog("A", 0.0, call("a", 100, 3))], cfg(max_num_batched_tokens=64), "fcfs")
    a = r.calls[0]
    assert (a.first_token, a.finish) == (2.0, 4.0)


def test_two_seqs_run_in_the_same_steps():
    r = simulate(
        [prog("A", 0.0, call("a", 10, 3)), prog("B", 0.0, call("b", 10, 2))], cfg(max_num_seqs=2), "fcfs"
    )
    rec = by_id(r)
    assert rec["A", "a"].finish == 3.0 and rec["B", "b"].finish == 2.0


def test_prefix_cache_hits_the_parent_context_on_the_same_engine():
    p = prog(
        "A", 0.0,
        call("c0", 100, 20, shared_prefix=SharedPrefix("sys", 64)),
        call("c1", 150, 5, parents=["c0"], context_of="c0"),
    )
    r = simulate([p], cfg(enable_prefix_caching=True), "fcfs")
    rec = by_id(r)
    # c0 computed 119 tokens (its last token is never computed): 7 full blocks.
    assert rec["A", "c1"].prefix_hit_tokens == 112
    assert rec["A", "c0"].prefix_hit_tokens == 0


@pytest.mark.parametrize("fast_forward", [True, False])
def test_a_call_admitted_in_the_same_step_hits_the_blocks_scheduled_before_it(fast_forward):
    # vLLM keys blocks when it schedules them. A and B (272 tokens, the first
    # 256 shared) arrive together: A is admitted first and its 17 blocks are
    # keyed at once, so B hits 16 of them ((272 - 1) // 16, the last token is
    # always computed) and prefills 16 tokens, in the same 1 s step.
    shared = SharedPrefix("sys", 256)
    programs = [prog("A", 0.0, call("a", 272, 2, shared_prefix=shared)), prog("B", 0.0, call("b", 272, 2, shared_prefix=shared))]
    config = cfg(enable_prefix_caching=True, max_num_seqs=2, fast_forward=fast_forward)
    r = simulate(programs, config, "fcfs")
    rec = by_id(r)
    assert rec["A", "a"].prefix_hit_tokens == 0 and rec["B", "b"].prefix_hit_tokens == 256
    assert r.stats["prefill_tokens"] == 272 + 16
    assert rec["B", "b"].first_token == rec["A", "a"].first_token == 1.0
    # In 30 blocks B fits beside A only through those hits (17 + 1 blocks,
    # not 17 + 17), so it is still admitted at t=0.
    r = simulate(programs, dataclasses.replace(config, engine=dataclasses.replace(config.engine, num_gpu_blocks=30)), "fcfs")
    assert by_id(r)["B", "b"].first_token == 1.0 and r.stats["prefill_tokens"] == 272 + 16


@pytest.mark.parametrize("fast_forward", [True, False])
def test_a_call_admitted_beside_a_running_prefill_hits_the_chunk_it_computes_in_that_step(fast_forward):
    # 1,024-token budget. A (3,000 tokens, the first 2,900 shared with B)
    # prefills in chunks at t=0, 1 and 2. B arrives at 0.5; at t=1 A's chunk
    # takes the whole budget. At t=2 A's last 952 tokens are scheduled first,
    # which keys A's blocks up to token 2,992, so B hits 181 blocks (2,896
    # tokens) and takes the 72 tokens left in the budget, then its last 32 at
    # t=3: first token at 4, finish at 5. Keying at step end would give B
    # 2,048 hits and 952 tokens more to prefill.
    shared = SharedPrefix("doc", 2900)
    programs = [prog("A", 0.0, call("a", 3000, 2, shared_prefix=shared)), prog("B", 0.5, call("b", 3000, 2, shared_prefix=shared))]
    config = cfg(enable_prefix_caching=True, max_num_seqs=2, max_num_batched_tokens=1024, fast_forward=fast_forward)
    r = simulate(programs, config, "fcfs")
    a, b = by_id(r)["A", "a"], by_id(r)["B", "b"]
    assert (a.first_token, a.finish) == (3.0, 4.0)
    assert (b.prefix_hit_tokens, b.first_scheduled, b.first_token, b.finish) == (2896, 2.0, 4.0, 5.0)
    assert r.stats["prefill_tokens"] == 3000 + 104


def test_swap_keeps_computed_kv_and_charges_its_pcie_transfer_to_the_steps():
    # PLAS, one slot, 1 s steps, a 2 s quantum. A's call runs t=0-3 (its
    # prompt, then two decodes: 102 tokens computed, 103 in its sequence);
    # B arrives at 2.5 in Q1 and displaces the demoted A at t=3.
    programs = [prog("A", 0.0, call("a", 100, 10)), prog("B", 2.5, call("b", 50, 2))]
    params = PolicyParams(queue_base=2.0, beta=1e9)
    swap = simulate(programs, cfg(params, preemption_mode="swap"), "plas")
    recompute = simulate(programs, cfg(params, preemption_mode="recompute"), "plas")
    # Llama-3.1-8B: 131,072 KV bytes per token, 16-token blocks, A100 PCIe at
    # 25 GB/s. A's 7 blocks go out in B's first step and back in A's next one.
    per_block = 16 * 131072 / 25e9
    assert swap.stats["swap_seconds"] == pytest.approx(2 * 7 * per_block)
    assert recompute.stats["swap_seconds"] == 0.0
    # Swap computes each prompt once; recompute re-prefills A's 103 tokens.
    assert swap.stats["prefill_tokens"] == 100 + 50
    assert recompute.stats["prefill_tokens"] == 100 + 50 + 103
    rs, rr = by_id(swap), by_id(recompute)
    assert (rr["B", "b"].first_scheduled, rr["B", "b"].finish, rr["A", "a"].finish) == (3.0, 5.0, 12.0)
    assert rs["B", "b"].finish == pytest.approx(5.0 + 7 * per_block)
    assert rs["A", "a"].finish == pytest.approx(12.0 + 2 * 7 * per_block)
    assert rs["A", "a"].preemptions == rr["A", "a"].preemptions == 1


def test_admission_waits_until_the_whole_prompt_fits_as_vllm_does():
    # 16 blocks of 16 tokens, 64-token budget, 1 s steps. A (64 + 40 tokens)
    # holds 5 blocks from t=1 and 7 at its end (t=40). B's 192-token prompt
    # needs 12 blocks: vLLM 0.26 (scheduler_reserve_full_isl) keeps it
    # waiting until A has finished, then prefills it in three chunks.
    programs = [prog("A", 0.0, call("a", 64, 40)), prog("B", 0.5, call("b", 192, 1))]
    config = cfg(num_gpu_blocks=16, max_num_seqs=2, max_num_batched_tokens=64)
    r = simulate(programs, config, "fcfs")
    rec = by_id(r)
    assert rec["A", "a"].finish == 40.0
    assert (rec["B", "b"].first_scheduled, rec["B", "b"].finish) == (40.0, 43.0)
    assert r.stats["preemptions"] == 0 and r.stats["prefill_tokens"] == 64 + 192
    # Checking the first chunk only (earlier vLLM) lets B in at t=1 on 63
    # tokens; at t=3 its third chunk no longer fits beside A, and B, the
    # latest arrival, preempts itself, again and again until A is done.
    first_chunk = dataclasses.replace(config, engine=dataclasses.replace(config.engine, scheduler_reserve_full_isl=False))
    r = simulate(programs, first_chunk, "fcfs")
    b = by_id(r)["B", "b"]
    assert b.first_scheduled == 1.0 and b.preemptions > 1 and r.stats["prefill_tokens"] > 64 + 192 * 2


def test_call_larger_than_kv_cache_is_a_clear_error():
    with pytest.raises(SimulationError, match=r"program 'A' call 'a'.*exceeds the KV cache"):
        simulate([prog("A", 0.0, call("a", 2000, 100))], cfg(num_gpu_blocks=10), "fcfs")


@pytest.mark.parametrize(
    "programs, message",
    [
        # A file with any of these is refused by `traces.validate`; programs built in Python were not checked.
        ([prog("A", 0.0, call("a", 10, 20), call("b", 12, 2, parents=["a"], context_of="a"))],
         "program 'A' call 'b': field 'context_of': context of 'a' is 30 tokens (prompt 10 + output 20), longer "
         "than this call's prompt_tokens 12"),
        # was a bare KeyError: 'zz'
        ([prog("A", 0.0, call("a", 10, 2, parents=["zz"]))],
         "program 'A' call 'a': field 'parents': names call 'zz', which is not in this program"),
        # was "1 programs did not finish: the simulation stalled"
        ([prog("A", 0.0, call("a", 10, 2, parents=["b"]), call("b", 10, 2, parents=["a"]))],
         "program 'A' call 'a': field 'parents': cycle: 'b' -> 'a' -> 'b'"),
        ([prog("A", 0.0)], "program 'A': field 'calls': expected a non-empty list of calls, got []"),
        # was "engine 0 stalled at t=... with runnable calls"
        ([prog("A", 0.0, call("a", 10, 0))], "program 'A' call 'a': field 'output_tokens': expected an integer > 0, "
         "got 0"),
        # was a TypeError from inside the replica
        ([prog("A", 0.0, call("a", "10", 2))], "program 'A' call 'a': field 'prompt_tokens': expected an integer "
         "> 0, got \"10\""),
        # these two ran as if nothing were wrong
        ([prog("A", float("nan"), call("a", 10, 2))], "program 'A': field 'arrival': expected a finite number >= 0, "
         "got NaN"),
        ([prog("A", 0.0, call("a", 10, 2)), prog("A", 1.0, call("a", 10, 2))], "program 'A': duplicate program id"),
        ([{"id": "A"}], "expected a traces.format.Program, got {\"id\": \"A\"}"),
    ],
)
def test_a_program_built_in_python_gets_the_trace_formats_errors(programs, message):
    with pytest.raises(SimulationError) as err:
        simulate(programs, cfg(), "fcfs")
    assert str(err.value) == f"invalid program: {message}"


def test_prompt_over_budget_without_chunking_is_a_clear_error():
    with pytest.raises(SimulationError, match="enable_chunked_prefill is false"):
        simulate(
            [prog("A", 0.0, call("a", 200, 1))],
            cfg(max_num_batched_tokens=100, enable_chunked_prefill=False),
            "fcfs",
        )


# ---------------------------------------------------------------- invariants
@st.composite
def workloads(draw):
    programs = []
    for i in range(draw(st.integers(1, 5))):
        calls: list[Call] = []
        for j in range(draw(st.integers(1, 4))):
            parents = sorted(set(draw(st.lists(st.sampled_from([c.id for c in calls]), max_size=2)))) if calls else []
            out = draw(st.integers(1, 12))
            extra = {}
            prompt = draw(st.integers(1, 120))
            if parents and draw(st.booleans()):
                src = next(c for c in calls if c.id == parents[0])
                extra["context_of"] = src.id
                prompt = src.context_tokens + draw(st.integers(1, 40))
            elif draw(st.booleans()):
                extra["shared_prefix"] = SharedPrefix("sys", min(prompt, 32))
            delay = draw(st.sampled_from([0.0, 0.0, 0.3, 1.7]))
            calls.append(Call(f"c{j}", tuple(parents), prompt, out, delay, **extra))
        programs.append(Program(f"p{i}", draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])), "h", tuple(calls)))
    return programs


@st.composite
def configs(draw):
    policy = draw(st.sampled_from(sorted(POLICY_CLASSES)))
    chunked = draw(st.booleans())
    engine = dict(
        num_gpu_blocks=draw(st.integers(20, 60)),
        max_num_seqs=draw(st.integers(1, 4)),
        max_num_batched_tokens=draw(st.sampled_from([4, 16, 64, 512])) if chunked else 1000,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=draw(st.booleans()),
        scheduler_reserve_full_isl=draw(st.booleans()),
        preemption_mode=draw(st.sampled_from(["recompute", "swap"])),
        replicas=draw(st.integers(1, 2)),
        balancer=draw(st.sampled_from(["round_robin", "least_used", "locality"])),
        async_scheduling=draw(st.booleans()),
    )
    if engine["enable_prefix_caching"]:  # Continuum's pins: off, shorter and longer than the tool delays
        engine["kv_ttl"] = draw(st.sampled_from([0.0, 0.5, 5.0]))
    params = PolicyParams(
        queue_base=draw(st.sampled_from([0.05, 1.0])),
        beta=draw(st.sampled_from([0.5, 8.0])),
        locality_threshold=64,
        mlfq_starve_after=2.0,
        preempt_limit=draw(st.sampled_from([1, 1, None])),
    )
    return policy, cfg(params, latency=0.1, **engine)


def simulate_or_livelock(programs, config, policy, **kw):
    """Run; the error's message if the run is a livelock, which only unlimited recompute preemption may cause."""
    try:
        return simulate(programs, config, policy, **kw)
    except SimulationError as e:
        assert "livelocked" in str(e), e
        assert config.policy_params.preempt_limit is None and config.engine.preemption_mode == "recompute"
        return str(e)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs=workloads(), setup=configs())
def test_invariants_hold_for_random_traces_and_configs(programs, setup):
    policy, config = setup
    check_invariants(programs, config, policy)


@st.composite
def pinned_setups(draw):
    """Traces with long tool delays on a cache barely larger than the largest call, with long pins.

    The general strategies rarely make pins compete for memory; these drop
    pins early in about 40% of examples.
    """
    programs = [
        dataclasses.replace(p, calls=tuple(
            dataclasses.replace(c, delay=draw(st.sampled_from([0.0, 2.0, 6.0]))) if c.parents else c
            for c in p.calls
        ))
        for p in draw(workloads())
    ]
    policy, config = draw(configs())
    largest = max(-(-(c.prompt_tokens + c.output_tokens) // 16) for p in programs for c in p.calls)
    engine = dataclasses.replace(
        config.engine, enable_prefix_caching=True, kv_ttl=draw(st.sampled_from([2.0, 50.0])),
        num_gpu_blocks=largest + draw(st.integers(0, 12)),
    )
    return programs, policy, dataclasses.replace(config, engine=engine)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=pinned_setups())
def test_invariants_and_lazy_identity_hold_while_pins_compete_for_memory(setup):
    programs, policy, config = setup
    check_invariants(programs, config, policy)
    check_lazy_identity(programs, config, policy)


@st.composite
def tight_setups(draw):
    """Traces on a KV cache a few blocks larger than their largest call, with 2-8 seats.

    The general strategies rarely fill the cache (median peak ~30%), so
    they almost never preempt for memory; here most examples do, so the
    invariants and the lazy identity are checked under memory preemption,
    recompute and swap.
    """
    programs = []
    for p in draw(workloads()):  # longer outputs than `workloads`: decodes that grow by blocks
        old = {c.id: c for c in p.calls}
        new: dict[str, Call] = {}
        for c in p.calls:  # parents first: a call that re-sends a context keeps its extra prompt tokens
            c = dataclasses.replace(c, output_tokens=draw(st.integers(1, 64)))
            if c.context_of is not None:
                extra = c.prompt_tokens - old[c.context_of].context_tokens
                c = dataclasses.replace(c, prompt_tokens=new[c.context_of].context_tokens + extra)
            new[c.id] = c
        programs.append(dataclasses.replace(p, calls=tuple(new.values())))
    policy, config = draw(configs())
    largest = max(-(-(c.prompt_tokens + c.output_tokens) // 16) for p in programs for c in p.calls)
    engine = dataclasses.replace(
        config.engine, num_gpu_blocks=largest + draw(st.integers(0, 4)), max_num_seqs=draw(st.integers(2, 8)),
    )
    return programs, policy, dataclasses.replace(config, engine=engine)


def test_invariants_and_lazy_identity_hold_under_memory_preemption():
    seen = {"memory preemption": 0, "swap": 0, "policy preemption": 0}

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(setup=tight_setups())
    def check(setup):
        programs, policy, config = setup
        result = check_invariants(programs, config, policy)
        check_lazy_identity(programs, config, policy)
        if isinstance(result, str) or not result.stats["preemptions"]:
            return
        # FCFS and program-level FCFS preempt only for memory.
        seen["memory preemption" if not POLICY_CLASSES[policy].preemptive else "policy preemption"] += 1
        seen["swap"] += result.stats["swap_seconds"] > 0

    check()
    # The examples must exercise what this test is for (derandomized: the same examples every run).
    assert seen["memory preemption"] >= 10 and seen["swap"] >= 15 and seen["policy preemption"] >= 40, seen


def check_invariants(programs, config, policy, min_step=quantize(0.1)):
    """Check the invariants on one run; returns the result (or the livelock's message)."""
    steps = []
    result = simulate_or_livelock(programs, config, policy, observer=steps.append)
    if isinstance(result, str):
        return result
    records = by_id(result)
    calls = {(p.id, c.id): (p, c) for p in programs for c in p.calls}
    # Every call finishes exactly once.
    assert len(result.calls) == len(calls) and set(records) == set(calls)
    for key, rec in records.items():
        p, c = calls[key]
        start = max((records[p.id, q].finish for q in c.parents), default=p.arrival)
        # Released exactly when its parents are done plus its delay; runs after that.
        assert rec.arrival == pytest.approx(start + c.delay)
        assert rec.arrival <= rec.first_scheduled <= rec.first_token <= rec.finish
        # Each output token needs a step; steps take at least min_step (0.1 s on the 2**-30 s grid by default).
        assert rec.service >= c.output_tokens * min_step - 1e-9
        # Service fits in the call's time on the engine (the record's waiting is clamped at 0: not checked there).
        assert rec.finish - rec.arrival - rec.service >= -1e-9
        # Prefix hits are whole blocks of the prompt, short of its last token (vLLM recomputes that one).
        hits = rec.prefix_hit_tokens
        assert hits % config.engine.block_size == 0 and 0 <= hits <= c.prompt_tokens - 1
        assert hits == 0 or config.engine.enable_prefix_caching
    # Every preemption is some call's: the engine's count is the calls' sum.
    assert sum(r.preemptions for r in result.calls) == result.stats["preemptions"]
    engine = config.engine
    for info in steps:
        assert info.kv_in_use <= info.kv_capacity  # KV never over capacity
        assert info.scheduled  # no empty step while work exists
        assert not info.head_waiting_fits  # never idle while a waiting call fits
        # The same, not trusting the replica's admission test: a call needs at most a block per
        # block_size of its tokens (prefix hits only lower that), so a head that fits by that
        # count, with a seat and budget left, must have been admitted.
        if info.head_call is not None and not info.memory_preempted:
            seat = info.seats_taken < engine.max_num_seqs
            budget = info.budget_left > 0 and (engine.enable_chunked_prefill
                                               or info.head_new_tokens <= info.budget_left)
            blocks = -(-info.head_tokens // engine.block_size)
            assert not (seat and budget and blocks <= info.kv_capacity - info.kv_in_use), (
                f"t={info.start}: {info.head_call} ({blocks} blocks) left waiting with "
                f"{info.kv_capacity - info.kv_in_use} free")
    # Never asleep while it holds a call: each call's time on its engine, arrival to finish,
    # lies inside one unbroken run of that engine's steps.
    runs: dict[int, list[list[float]]] = {}
    for info in sorted(steps, key=lambda i: (i.replica, i.start)):
        end = max(info.end, info.start)
        merged = runs.setdefault(info.replica, [])
        if merged and info.start <= merged[-1][1] + 1e-9:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([info.start, end])
    for key, rec in records.items():
        assert any(a - 1e-9 <= rec.arrival and rec.finish <= b + 1e-9 for a, b in runs[rec.engine]), (
            f"{key}: on engine {rec.engine} from {rec.arrival} to {rec.finish}, which slept in between")
    # A program's latency covers its critical path: service plus delays.
    for p in programs:
        path: dict[str, float] = {}
        for c in p.calls:  # calls are listed after their parents here
            path[c.id] = records[p.id, c.id].service + c.delay + max((path[q] for q in c.parents), default=0.0)
        prec = next(r for r in result.programs if r.program_id == p.id)
        assert prec.latency >= max(path.values()) - 1e-9
        # A program ends with its last call.
        assert prec.finish == max(records[p.id, c.id].finish for c in p.calls)
    return result


def test_same_config_and_trace_give_identical_records():
    programs = [
        prog(f"p{i}", i * 0.3, call("a", 40 + i, 5), call("b", 80, 4, parents=["a"], context_of="a"))
        for i in range(12)
    ]
    config = cfg(max_num_seqs=3, num_gpu_blocks=30, enable_prefix_caching=True)
    for policy in POLICY_CLASSES:
        a = simulate(programs, config, policy)
        b = simulate(programs, config, policy)
        assert [dataclasses.astuple(r) for r in a.calls] == [dataclasses.astuple(r) for r in b.calls]


# ---------------------------------------------------------------- behaviour
def _plas_vs_fcfs_trace():
    # A has attained 10 s of service when its second call arrives (t=10);
    # X keeps the single slot busy from t=10 to t=20; B, a fresh program,
    # arrives at t=10.5. At t=20 the engine must choose between A/c1
    # (arrived first, program service 10) and B (arrived later, service 0).
    return [
        prog("A", 0.0, call("c0", 10, 10), call("c1", 10, 10, parents=["c0"])),
        prog("X", 0.1, call("x", 10, 10)),
        prog("B", 10.5, call("b", 10, 10)),
    ]


def test_plas_serves_the_program_with_less_attained_service_first():
    never_starve = PolicyParams(beta=1e9, queue_base=100.0)  # one queue wide enough: no preemption
    r_fcfs = by_id(simulate(_plas_vs_fcfs_trace(), cfg(), "fcfs"))
    assert r_fcfs["A", "c1"].finish < r_fcfs["B", "b"].finish  # FCFS: arrival order
    params = PolicyParams(beta=1e9, queue_base=5.0)  # A (10 s) lands below B (0 s)
    r_plas = by_id(simulate(_plas_vs_fcfs_trace(), cfg(params), "plas"))
    assert r_plas["B", "b"].finish < r_plas["A", "c1"].first_scheduled
    r_same = by_id(simulate(_plas_vs_fcfs_trace(), cfg(never_starve), "plas"))
    assert r_same["A", "c1"].finish < r_same["B", "b"].finish  # same queue: FCFS inside it


def test_program_fcfs_serves_the_earlier_program_first_where_fcfs_serves_the_earlier_call():
    # A (arrived at 0) is in tool time from t=2 to t=3.5; B and C arrive
    # meanwhile and queue behind X. When the slot frees at t=12, FCFS runs the
    # calls in their own arrival order (B, C, then A's second call); program
    # FCFS runs A's second call first, as A is the oldest program.
    programs = [
        prog("A", 0.0, call("a0", 10, 2), call("a1", 10, 2, parents=["a0"], delay=1.5)),
        prog("X", 1.0, call("x", 10, 10)),
        prog("B", 2.5, call("b", 10, 2)),
        prog("C", 3.0, call("c", 10, 2)),
    ]
    fcfs = by_id(simulate(programs, cfg(), "fcfs"))
    assert [fcfs[k].first_scheduled for k in (("B", "b"), ("C", "c"), ("A", "a1"))] == [12.0, 14.0, 16.0]
    pf = by_id(simulate(programs, cfg(), "program_fcfs"))
    assert [pf[k].first_scheduled for k in (("A", "a1"), ("B", "b"), ("C", "c"))] == [12.0, 14.0, 16.0]
    assert {p.program_id: p.latency for p in simulate(programs, cfg(), "program_fcfs").programs}["A"] == 14.0


def test_program_fcfs_keeps_histories_cached_where_call_level_orders_evict_them():
    # Eight four-turn programs, each turn re-sending the history (up to ~700
    # tokens) after 1 s of tool time, arrive within 2 s; the cache holds
    # 1,280 tokens, under two programs' full histories. Call-level FCFS and
    # PLAS admit every new program's first call ahead of older programs'
    # later turns, so the cache cycles through all eight and the later turns
    # re-prefill; program FCFS finishes the oldest programs first and their
    # histories are still cached when their next turn comes.
    programs = []
    for i in range(8):
        turns = [call("c0", 160, 16)]
        for j in range(1, 4):
            turns.append(call(f"c{j}", 176 * j + 160, 16, parents=[f"c{j - 1}"], delay=1.0, context_of=f"c{j - 1}"))
        programs.append(prog(f"P{i}", 0.25 * i, *turns))
    config = cfg(latency=0.05, num_gpu_blocks=80, max_num_seqs=4, enable_prefix_caching=True,
                 max_num_batched_tokens=512)
    hits, latency = {}, {}
    for policy in ("fcfs", "plas", "program_fcfs"):
        r = simulate(programs, config, policy)
        hits[policy] = sum(c.prefix_hit_tokens for c in r.calls)
        latency[policy] = sum(p.latency for p in r.programs) / len(r.programs)
    assert hits["program_fcfs"] > 5 * max(hits["fcfs"], hits["plas"])
    assert latency["program_fcfs"] < min(latency["fcfs"], latency["plas"])


# Continuum's KV time-to-live (engine.kv_ttl): 1 s steps, a 10-block cache.
def _pin_trace(b_prompt, with_x=True):
    # A's first call leaves a 64-token history (4 full blocks) at t=2 and its
    # follow-up re-sends it after 1.5 s of tool time; B, a new program,
    # arrives during the tool time needing more blocks than are empty; X
    # keeps the engine busy (2 blocks) throughout.
    programs = [prog("A", 0.0, call("c0", 64, 2), call("c1", 80, 1, parents=["c0"], delay=1.5, context_of="c0"))]
    if with_x:
        programs.append(prog("X", 0.0, call("x", 16, 20)))
    return programs + [prog("B", 2.5, call("b", b_prompt, 1))]


def _pin_cfg(ttl, policy_params=None, **engine):
    return cfg(policy_params, latency=1.0, num_gpu_blocks=10, max_num_seqs=2, enable_prefix_caching=True, kv_ttl=ttl,
               **engine)


def test_kv_ttl_keeps_a_history_for_the_follow_up_under_program_fcfs():
    # Without pins B is admitted at t=3 and evicts A's last two cached
    # blocks, so c1 (t=4) hits 32 tokens. With a 10 s pin B (6 blocks)
    # cannot have the 4 pinned ones while X runs; at t=4 program FCFS puts
    # c1 (A is the older program) first: it hits all 64 tokens, takes one
    # fresh block and releases the pin; B runs when c1 is done.
    plain = by_id(simulate(_pin_trace(96), _pin_cfg(0.0), "program_fcfs"))
    assert (plain["A", "c1"].prefix_hit_tokens, plain["B", "b"].first_scheduled) == (32, 3.0)
    pinned = simulate(_pin_trace(96), _pin_cfg(10.0), "program_fcfs")
    r = by_id(pinned)
    assert (r["A", "c1"].first_scheduled, r["A", "c1"].prefix_hit_tokens, r["A", "c1"].finish) == (4.0, 64, 5.0)
    assert (r["B", "b"].first_scheduled, r["B", "b"].finish) == (5.0, 6.0)
    assert (pinned.stats["kv_pins"], pinned.stats["kv_pins_dropped"]) == (1.0, 0.0)


def test_kv_ttl_under_call_level_fcfs_blocks_the_queue_until_the_pin_expires():
    # FCFS queues B ahead of c1, and admission stops at the first call that
    # does not fit: both wait for the pin to expire (t=2+10), and then B's
    # blocks evict A's tail anyway. Pins need a program-level order.
    r = by_id(simulate(_pin_trace(96), _pin_cfg(10.0), "fcfs"))
    assert (r["B", "b"].first_scheduled, r["A", "c1"].first_scheduled) == (12.0, 13.0)
    assert r["A", "c1"].prefix_hit_tokens == 32


@pytest.mark.parametrize("fast_forward", [True, False])
def test_kv_ttl_never_idles_the_engine_or_preempts_a_running_call(fast_forward):
    # Idle engine: B (7 blocks) arrives with nothing running and 4 blocks
    # pinned; the pin is dropped and B runs at once, as without pins.
    idle = simulate(_pin_trace(112, with_x=False), _pin_cfg(10.0, fast_forward=fast_forward), "fcfs")
    plain = simulate(_pin_trace(112, with_x=False), _pin_cfg(0.0, fast_forward=fast_forward), "fcfs")
    assert by_id(idle)["B", "b"].first_scheduled == 2.5
    assert [dataclasses.astuple(c) for c in idle.calls] == [dataclasses.astuple(c) for c in plain.calls]
    assert idle.stats["kv_pins_dropped"] == 1.0
    # Growth: A's 128-token history is pinned (8 blocks) through 100 s of
    # tool time while X decodes 40 tokens; X's third block (t=17) needs the
    # pinned memory, and takes it instead of preempting itself.
    programs = [
        prog("A", 0.0, call("c0", 128, 1), call("c1", 140, 1, parents=["c0"], delay=100.0, context_of="c0")),
        prog("X", 0.0, call("x", 16, 40)),
    ]
    grown = simulate(programs, _pin_cfg(1000.0, fast_forward=fast_forward), "fcfs")
    r = by_id(grown)
    assert (r["X", "x"].preemptions, r["X", "x"].finish) == (0, 40.0)
    assert (grown.stats["kv_pins_dropped"], grown.stats["preemptions"]) == (1.0, 0.0)
    assert r["A", "c1"].prefix_hit_tokens == 96  # X's growth evicted two of the eight blocks
    assert grown.stats["sim_time"] == 102.0  # the run ends with c1, not when the dropped pin's TTL would (1001)
    # Policy preemption: under PLAS, B (a new program, t=5.5) outranks X
    # (4 s of service past a 1 s bound) and needs 6 blocks while A's pin
    # holds 4 and X 2; the pin is released instead of X being preempted.
    programs = [
        prog("A", 0.0, call("c0", 64, 2), call("c1", 80, 1, parents=["c0"], delay=100.0, context_of="c0")),
        prog("X", 0.0, call("x", 16, 40)),
        prog("B", 5.5, call("b", 96, 1)),
    ]
    plas = PolicyParams(queue_base=1.0, beta=1e9)
    ranked = simulate(programs, _pin_cfg(1000.0, fast_forward=fast_forward, policy_params=plas), "plas")
    r = by_id(ranked)
    assert (r["B", "b"].first_scheduled, r["X", "x"].preemptions, r["X", "x"].finish) == (6.0, 0, 40.0)
    assert (ranked.stats["kv_pins_dropped"], ranked.stats["preemptions"]) == (1.0, 0.0)


def test_a_policy_victim_sits_out_the_step_that_preempted_it():
    # At t=3 W (little work left) outranks A under SRPT, and the victim
    # search, which counts every prefix hit as taking a block (a hit on
    # blocks A holds takes none), preempts A to fit W's 7 blocks.
    # W hits 96 shared tokens and takes 1 block, so A would fit again at
    # once; like the vLLM plugin, the engine readmits it only next step.
    sys_prompt = SharedPrefix("sys", 96)
    programs = [
        prog("A", 0.0, call("a", 100, 60, shared_prefix=sys_prompt)),
        prog("V", 0.0, call("v", 40, 60)),
        prog("W", 3.0, call("w", 104, 5, shared_prefix=sys_prompt)),
    ]
    steps = []
    simulate(programs, cfg(num_gpu_blocks=16, max_num_seqs=4, enable_prefix_caching=True), "srpt",
             observer=steps.append)
    batches = {info.start: dict(info.scheduled) for info in steps}
    assert batches[3.0] == {"V/v": 1, "W/w": 8}  # W's 104 tokens less its 96 hit
    assert batches[4.0] == {"W/w": 1, "V/v": 1, "A/a": 7}  # A back: it recomputes the 7 tokens past the cached 96


def test_the_victim_search_counts_prefix_hits_that_admission_takes_from_the_free_blocks():
    # Checking only the first chunk (scheduler_reserve_full_isl off), W's
    # 201-token call hits H's 160 cached tokens: its first 32-token chunk
    # needs those 10 cached free blocks plus 2 fresh ones, 12 of the 11
    # free. The search counted 2 (the chunk, hits ignored), took no victim,
    # and W, SRPT's best by far, then failed admission behind V for 97 s.
    doc = SharedPrefix("doc", 160)
    programs = [
        prog("H", 0.0, call("h", 161, 1, shared_prefix=doc)),
        prog("V", 6.0, call("v", 64, 100)),
        prog("W", 10.0, call("w", 201, 5, shared_prefix=doc)),
    ]
    steps = []
    config = cfg(num_gpu_blocks=16, max_num_seqs=4, max_num_batched_tokens=32, enable_prefix_caching=True,
                 scheduler_reserve_full_isl=False)
    rec = by_id(simulate(programs, config, "srpt", observer=steps.append))
    batches = {info.start: dict(info.scheduled) for info in steps}
    assert batches[10.0] == {"W/w": 32}  # V preempted: W runs past its 160 hit tokens
    assert rec["W", "w"].first_scheduled == 10.0 and rec["W", "w"].finish == 16.0
    assert rec["W", "w"].prefix_hit_tokens == 160 and rec["V", "v"].preemptions == 1


def test_a_policy_victim_is_taken_for_the_budget_a_running_prefill_spends_not_only_for_a_seat():
    # B decodes (demoted to Q2 by t=6), C's 200-token prefill (Q1) spends the
    # whole 16-token budget, and D (Q0, 5 tokens) arrives with both seats
    # taken. The search gave D the worst call's seat: B was preempted, C still
    # took the budget first, and D waited 6 s behind the call it outranks.
    programs = [
        prog("B", 0.0, call("b", 1, 20)),
        prog("C", 4.0, call("c", 200, 1)),
        prog("D", 6.0, call("d", 5, 1)),
    ]
    config = cfg(PolicyParams(queue_base=1.0), latency=1.0, max_num_seqs=2, max_num_batched_tokens=16,
                 enable_chunked_prefill=True, num_gpu_blocks=100)
    steps = []
    rec = by_id(simulate(programs, config, "plas", observer=steps.append))
    batches = {info.start: dict(info.scheduled) for info in steps}
    assert batches[5.0] == {"C/c": 16}  # C first in key order: B gets no budget
    assert batches[6.0] == {"B/b": 1, "D/d": 5}  # C out for D, which runs at once; B keeps its seat
    assert rec["D", "d"].first_scheduled == 6.0 and rec["D", "d"].finish == 7.0
    assert rec["C", "c"].preemptions == 1 and rec["B", "b"].preemptions == 0


def test_no_victim_is_taken_for_budget_an_earlier_admitted_chunk_takes_first():
    # D (100 tokens) and E (5) arrive together in Q0 beside B's demoted
    # decode; D's chunk takes the 15 tokens B leaves. Preempting B gives
    # back one token, which D's chunk takes, not E: B was preempted and E
    # still not admitted (a review's case).
    programs = [prog("B", 0.0, call("b", 1, 20)), prog("D", 6.0, call("d", 100, 1)), prog("E", 6.0, call("e", 5, 1))]
    config = cfg(PolicyParams(queue_base=1.0), latency=1.0, max_num_seqs=3, max_num_batched_tokens=16,
                 enable_chunked_prefill=True, num_gpu_blocks=100)
    steps = []
    rec = by_id(simulate(programs, config, "plas", observer=steps.append))
    batches = {info.start: dict(info.scheduled) for info in steps}
    assert batches[6.0] == {"B/b": 1, "D/d": 15}
    assert rec["B", "b"].preemptions == 0


def test_no_victims_are_pieced_together_from_decodes_for_the_budget():
    # Four demoted decodes spend 4 of 16 tokens; D (Q0) arrives with 14 and
    # takes the 12 left, and E (Q0) lacks three more. Three decodes, one
    # token each, were preempted to start E one step sooner. No single
    # victim covers E's lack, so E waits a step and no decode goes.
    programs = [prog(f"B{i}", 0.0, call("b", 1, 40)) for i in range(4)]
    programs += [prog("D", 20.0, call("d", 14, 1)), prog("E", 20.0, call("e", 5, 1))]
    config = cfg(PolicyParams(queue_base=1.0), latency=1.0, max_num_seqs=6, max_num_batched_tokens=16,
                 enable_chunked_prefill=True, num_gpu_blocks=100)
    steps = []
    rec = by_id(simulate(programs, config, "plas", observer=steps.append))
    batches = {info.start: dict(info.scheduled) for info in steps}
    assert batches[20.0] == {"B0/b": 1, "B1/b": 1, "B2/b": 1, "B3/b": 1, "D/d": 12}
    assert batches[21.0] == {"B0/b": 1, "B1/b": 1, "B2/b": 1, "B3/b": 1, "D/d": 2, "E/e": 5}
    assert all(rec[f"B{i}", "b"].preemptions == 0 for i in range(4))


def test_without_chunked_prefill_a_prompt_waits_rather_than_take_decodes_for_the_budget():
    # Three decodes leave D 61 of 64 tokens. With 62 one decode's token
    # covers the lack and the worst goes at once. With 63 no single decode
    # covers two (two were preempted): D waits until B0 finishes, and then
    # one decode covers the one it still lacks.
    def run(prompt):
        programs = [prog(f"B{i}", 0.0, call("b", 1, 30 + 2 * i)) for i in range(3)]
        programs.append(prog("D", 20.0, call("d", prompt, 1)))
        config = cfg(PolicyParams(queue_base=1.0), latency=1.0, max_num_seqs=4, max_num_batched_tokens=64,
                     enable_chunked_prefill=False, num_gpu_blocks=100)
        return by_id(simulate(programs, config, "plas"))

    rec = run(62)
    assert rec["D", "d"].first_scheduled == 20.0
    assert sum(rec[f"B{i}", "b"].preemptions for i in range(3)) == 1
    rec = run(63)
    assert rec["D", "d"].first_scheduled == rec["B0", "b"].finish == 30.0
    assert [rec[f"B{i}", "b"].preemptions for i in range(3)] == [0, 0, 1]


def test_atlas_runs_parallel_siblings_as_a_gang():
    # P's root finishes, then four siblings are released together. A rival
    # program R with more attained service has a call waiting. With room
    # for two sequences, ATLAS runs P's siblings in pairs before R's call.
    programs = [
        prog("R", 0.0, call("r0", 10, 6), call("r1", 10, 3, parents=["r0"], delay=1.0)),
        prog("P", 0.5, call("root", 10, 2), *[call(k, 10, 2, parents=["root"]) for k in "abcd"]),
    ]
    params = PolicyParams(beta=1e9, queue_base=2.0)
    rec = by_id(simulate(programs, cfg(params, max_num_seqs=2), "atlas"))
    starts = sorted(rec["P", k].first_scheduled for k in "abcd")
    assert starts[0] == starts[1] and starts[2] == starts[3]  # admitted in pairs, together
    assert max(rec["P", k].finish for k in "abcd") <= rec["R", "r1"].first_scheduled


def test_anti_starvation_bounds_the_wait_of_a_low_priority_call():
    # A's second call (program service 5 s) competes with a stream of fresh
    # one-call programs that PLAS always prefers.
    stream = [prog(f"B{i}", 5.0 + 2.0 * i, call("b", 10, 2)) for i in range(40)]
    programs = [prog("A", 0.0, call("c0", 10, 5), call("c1", 10, 5, parents=["c0"]))] + stream

    def first_wait(beta):
        params = PolicyParams(beta=beta, queue_base=1.0)
        rec = by_id(simulate(programs, cfg(params), "plas"))["A", "c1"]
        return rec.first_scheduled - rec.arrival

    # beta = 2: promoted once W_c >= 2 x 5 s; then at most one Q1 call ahead.
    assert first_wait(2.0) <= 10.0 + 2.0 + 2.0
    assert first_wait(1e9) > 60.0  # without it, A waits for the whole stream


def test_locality_pins_long_calls_and_spreads_short_ones():
    programs = []
    for i in range(6):
        calls = [call("c0", 3000, 4)]
        for j in range(1, 4):
            calls.append(call(f"c{j}", 3000 + 50 * j, 4, parents=[f"c{j - 1}"], delay=0.2))
        programs.append(prog(f"L{i}", i * 0.1, *calls))
    shorts = [prog(f"S{i}", i * 0.05, call("c0", 100, 4)) for i in range(12)]
    config = cfg(
        PolicyParams(locality_threshold=2048), replicas=2, max_num_seqs=4,
        max_num_batched_tokens=8192, balancer="locality",
    )
    r = simulate(programs + shorts, config, "plas")
    engines: dict[str, set[int]] = {}
    for rec in r.calls:
        engines.setdefault(rec.program_id, set()).add(rec.engine)
    assert all(len(engines[f"L{i}"]) == 1 for i in range(6))  # pinned
    assert {next(iter(engines[f"S{i}"])) for i in range(12)} == {0, 1}  # spread


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs=workloads(), setup=configs(), latency=st.sampled_from(["constant", "roofline"]))
def test_lazy_decode_accounting_is_identical_to_stepping(programs, setup, latency):
    policy, config = setup
    lat = LatencyConfig(kind="constant", seconds=0.1) if latency == "constant" else LatencyConfig()
    check_lazy_identity(programs, dataclasses.replace(config, latency=lat), policy)


@pytest.fixture(scope="module")
def cpu_bound_latency(tmp_path_factory):
    """A fitted model whose small steps are CPU-bound under async (host 0.04 of a 0.071 s step), big ones not."""
    model = FittedLatency(0.002, 0.03, 0.0, 1e-5, 0.001, 0.04, name="cpu-bound", host_per_step=0.03,
                          host_per_seq=0.01)
    path = tmp_path_factory.mktemp("latency") / "cpu-bound.json"
    path.write_text(json.dumps(model.to_json()))
    return LatencyConfig(kind="fitted", name=str(path))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs=workloads(), setup=configs())
def test_async_host_overlap_keeps_the_invariants_and_the_lazy_identity(cpu_bound_latency, programs, setup):
    # Every step takes at least the host time of a one-sequence step, 0.04 s.
    policy, config = setup
    config = dataclasses.replace(config, latency=cpu_bound_latency,
                                 engine=dataclasses.replace(config.engine, async_scheduling=True))
    check_invariants(programs, config, policy, min_step=0.04 - 1e-9)
    check_lazy_identity(programs, config, policy)


def test_async_a_member_demoted_then_preempted_by_the_next_schedule_keeps_the_lazy_identity(cpu_bound_latency):
    """Found by the hypothesis test above. p2/c2's quantum ran out in a step; the lazy path deferred the
    service of every step since it joined the cohort to that step's output, so the next schedule, which
    preempted it, gave it a starvation deadline without them (the per-step path had handed the core all
    but the last step). The promotion order of p2/c2 and p3/c1 then differed."""
    programs = [
        prog("p0", 0.0, call("c0", 1, 1), call("c1", 1, 1), call("c2", 1, 1, delay=0.3), workload="h"),
        prog("p1", 3.0, call("c0", 108, 1), call("c1", 1, 1, parents=["c0"]), call("c2", 44, 1), call("c3", 1, 1),
             workload="h"),
        prog("p2", 0.0, call("c0", 1, 2, delay=0.3), call("c1", 85, 8), call("c2", 87, 6, parents=["c1"], delay=1.7),
             workload="h"),
        prog("p3", 0.0, call("c0", 32, 6), call("c1", 70, 6, parents=["c0"], delay=1.7), workload="h"),
        prog("p4", 1.0, call("c0", 1, 10), call("c1", 43, 2, delay=1.7), workload="h"),
    ]
    config = ExperimentConfig(
        "test",
        engine=EngineConfig(max_num_seqs=2, max_num_batched_tokens=1000, enable_chunked_prefill=False,
                            enable_prefix_caching=False, scheduler_reserve_full_isl=False, preemption_mode="swap",
                            num_gpu_blocks=20, async_scheduling=True),
        latency=cpu_bound_latency,
        policy_params=PolicyParams(num_queues=8, queue_base=0.05, beta=0.5, preempt_limit=1, locality_threshold=64),
    )
    check_lazy_identity(programs, config, "atlas")


@st.composite
def tied_workloads(draw):
    """`workloads` with every arrival and tool delay a multiple of 0.5 s, the steps' exact length.

    With 0.1 s steps (the other strategies) an arrival almost never lands
    exactly on a step's end, as 0.1 is not a binary fraction; here most do.
    """
    programs = draw(workloads())
    half = st.sampled_from([0.0, 0.5, 1.0, 1.5, 3.0])
    return [
        dataclasses.replace(p, arrival=draw(half), calls=tuple(dataclasses.replace(c, delay=draw(half))
                                                              for c in p.calls))
        for p in programs
    ]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(programs=tied_workloads(), setup=configs())
def test_arrivals_tied_with_step_ends_keep_the_invariants_and_the_lazy_identity(programs, setup):
    # A call submitted at the instant a step ends, by the program runner or
    # by a call finishing on another replica, joins when the step in flight
    # ends (SimPy's event order decides which step that is; both paths must
    # see the same one).
    policy, config = setup
    config = dataclasses.replace(config, latency=LatencyConfig(kind="constant", seconds=0.5))
    check_invariants(programs, config, policy, min_step=0.5)
    check_lazy_identity(programs, config, policy)


def test_a_call_arriving_as_a_step_ends_joins_the_next_step():
    # Two seats, 1 s steps. B arrives at exactly t=1, as A's first step
    # ends: synchronously it is in the step scheduled then, [1,2). Under
    # async scheduling that step was scheduled while [0,1) ran, before B
    # arrived, so B starts at 2, as a call arriving during [0,1) would.
    programs = [prog("A", 0.0, call("a", 10, 4)), prog("B", 1.0, call("b", 10, 2))]
    for config, start in ((cfg(max_num_seqs=2), 1.0), (_async(max_num_seqs=2), 2.0)):
        for fast_forward in (True, False):
            c = dataclasses.replace(config, engine=dataclasses.replace(config.engine, fast_forward=fast_forward))
            r = by_id(simulate(programs, c, "fcfs"))
            assert (r["B", "b"].first_scheduled, r["B", "b"].finish) == (start, start + 2.0)
            assert r["A", "a"].finish == 4.0


def check_lazy_identity(programs, config, policy):
    runs = {}
    for ff in (True, False):
        c = dataclasses.replace(config, engine=dataclasses.replace(config.engine, fast_forward=ff))
        runs[ff] = simulate_or_livelock(programs, c, policy)
    fast, slow = runs[True], runs[False]
    if isinstance(fast, str) or isinstance(slow, str):
        assert fast == slow  # the same livelock, at the same step, with and without lazy accounting
        return
    assert [dataclasses.astuple(r) for r in fast.calls] == [dataclasses.astuple(r) for r in slow.calls]
    assert [dataclasses.astuple(r) for r in fast.programs] == [dataclasses.astuple(r) for r in slow.programs]
    assert slow.stats["lazy_decode_steps"] == slow.stats["coasted_steps"] == 0
    lazy_only = ("lazy_decode_steps", "coasted_steps")
    assert {k: v for k, v in fast.stats.items() if k not in lazy_only} == {
        k: v for k, v in slow.stats.items() if k not in lazy_only
    }


def test_async_lazy_path_keys_the_block_of_a_recompute_that_ends_one_token_short():
    # p1/c2, preempted after generating, recomputes in 4-token chunks; the
    # chunk ending at its last known token joins it to the decode cohort
    # without sampling, so its next decode's input is not in flight and
    # vLLM keys the block that decode fills at once. When p1/c2 is preempted
    # again at the next schedule, the block must be cached as the per-step
    # path has it, or later prefix hits differ.
    sys_prompt = SharedPrefix("sys", 32)
    programs = [
        prog("p0", 3.0, call("c0", 148, 10, delay=1.7)),
        prog("p1", 0.2, call("c0", 150, 1, shared_prefix=sys_prompt), call("c1", 138, 10, shared_prefix=sys_prompt),
             call("c2", 188, 10, parents=["c1"], context_of="c1")),
        prog("p2", 0.2, call("c0", 21, 60, shared_prefix=SharedPrefix("sys", 21))),
    ]
    params = PolicyParams(queue_base=0.3, beta=0.5, preempt_limit=None)
    config = cfg(params, latency=0.1, num_gpu_blocks=30, max_num_seqs=2, max_num_batched_tokens=4,
                 enable_prefix_caching=True, async_scheduling=True)
    check_lazy_identity(programs, config, "plas")


def test_lazy_path_accounts_steady_decodes_in_the_cohort():
    programs = [prog(f"p{i}", 0.0, call("a", 50, 200)) for i in range(4)]
    config = cfg(max_num_seqs=8, latency=0.01)
    r = simulate(programs, config, "plas")
    # 4 calls x 199 decode steps after the prefill step that samples token 1.
    assert r.stats["lazy_decode_steps"] == 4 * 199
    slow = simulate(programs, dataclasses.replace(config, engine=dataclasses.replace(config.engine, fast_forward=False)), "plas")
    assert [dataclasses.astuple(x) for x in r.calls] == [dataclasses.astuple(x) for x in slow.calls]
    assert slow.stats["coasted_steps"] == 0
    # PLAS: quantum expiries end a coast, so fewer steps coast than under FCFS.
    assert 0 < r.stats["coasted_steps"] < 197


def test_pure_decode_steps_coast_in_one_timeout_until_a_call_finishes():
    # 4 calls arrive together: step 0 prefills all (token 1), cohort steps
    # 0..198 decode tokens 2..200. Step 0 of the cohort is scheduled as usual
    # and coasts through cohort steps 1..197; step 198 samples every last
    # token, so it is scheduled on its own (FCFS has no quantum to end a coast).
    programs = [prog(f"p{i}", 0.0, call("a", 50, 200)) for i in range(4)]
    config = cfg(max_num_seqs=8, latency=0.01)
    r = simulate(programs, config, "fcfs")
    assert r.stats["steps"] == 200
    assert r.stats["coasted_steps"] == 197
    assert all(rec.finish == pytest.approx(2.0) for rec in r.calls)
    # A program arriving mid-coast bounds it: its call joins the next step, as stepping does.
    late = programs + [prog("late", 0.505, call("a", 50, 10))]
    fast = simulate(late, config, "fcfs")
    slow = simulate(late, dataclasses.replace(config, engine=dataclasses.replace(config.engine, fast_forward=False)), "fcfs")
    assert [dataclasses.astuple(x) for x in fast.calls] == [dataclasses.astuple(x) for x in slow.calls]
    assert fast.stats["coasted_steps"] < 197
    rec = {x.program_id: x for x in fast.calls}["late"]
    assert rec.first_scheduled == pytest.approx(0.51)


def test_shared_block_keys_give_the_same_results_and_check_the_block_size():
    from sim.simulate import BlockKeys

    programs = [
        prog("A", 0.0, call("c0", 40, 5), call("c1", 60, 5, parents=["c0"], context_of="c0")),
        prog("B", 0.2, call("c0", 40, 5)),
    ]
    config = cfg(max_num_seqs=4, enable_prefix_caching=True)
    shared = BlockKeys(config.engine.block_size)
    first = simulate(programs, config, "plas", block_keys=shared)
    again = simulate(programs, config, "fcfs", block_keys=shared)
    fresh = simulate(programs, config, "fcfs")
    assert [dataclasses.astuple(r) for r in again.calls] == [dataclasses.astuple(r) for r in fresh.calls]
    assert first.calls and any(r.prefix_hit_tokens for r in first.calls)
    with pytest.raises(ValueError, match="blocks of 32, not 16"):
        simulate(programs, config, "fcfs", block_keys=BlockKeys(32))


def test_srpt_refresh_from_another_replica_keeps_the_steps_charge_order():
    # Found by the equivalence test. Two replicas, round robin, 0.1 s steps:
    # at t=4.1 replica 1 finishes p4/c0, and the SRPT refresh re-ranks p4/c1
    # on replica 0 while that replica's step is in flight. The step's calls
    # must still finish in the order the step was scheduled, as stepping does.
    programs = [
        prog("p0", 3.0, call("c0", 17, 1), call("c1", 1, 1), call("c2", 1, 6)),
        prog("p2", 3.0, call("c0", 65, 7)),
        prog("p4", 3.0, call("c0", 46, 6), call("c1", 76, 1), call("c2", 1, 1)),
    ]
    config = cfg(
        PolicyParams(queue_base=0.05, beta=0.5), latency=0.1, replicas=2, balancer="round_robin",
        max_num_seqs=2, max_num_batched_tokens=16, enable_chunked_prefill=True, num_gpu_blocks=20,
    )
    lazy = simulate(programs, config, "srpt")
    slow = simulate(programs, dataclasses.replace(config, engine=dataclasses.replace(config.engine, fast_forward=False)), "srpt")
    assert [dataclasses.astuple(r) for r in lazy.calls] == [dataclasses.astuple(r) for r in slow.calls]
    assert [(r.program_id, r.call_id) for r in slow.calls if r.finish == slow.calls[-1].finish][-2:] == [("p2", "c0"), ("p4", "c1")]


def test_starvation_across_replicas_is_promoted_by_the_replica_holding_the_call():
    # Found in review: replica 0 coasts while a program's call waits on
    # replica 1; a finish on replica 0 used to put that call's starvation
    # deadline in replica 0's heap, so the promotion time depended on
    # replica 0's step boundaries (and replica 1 did not re-sort). Now each
    # replica promotes its own calls and the lazy path equals stepping.
    programs = [  # round robin: engine 0, 1, 0, 1, ...
        prog("Q", 0.0, call("q", 10, 400)),
        prog("Y1", 0.0, call("y1", 10, 3000)),
        prog("D", 0.0, call("d", 10, 2)),
        prog("Y2", 0.0, call("y2", 10, 3000)),
        prog("P", 0.0, call("a", 10, 4), call("r", 10, 3, ["a"]), call("w", 10, 3, ["a"])),
        prog("X", 0.0, call("x", 30000, 5)),
        prog("Z", 0.9153665890917182, call("z0", 10, 3), call("z1", 10, 3)),
    ]
    runs = {}
    for ff in (True, False):
        config = ExperimentConfig(
            "t",
            engine=EngineConfig(
                num_gpu_blocks=20000, max_num_seqs=3, max_num_batched_tokens=512, enable_chunked_prefill=True,
                enable_prefix_caching=False, replicas=2, balancer="round_robin", fast_forward=ff,
            ),
            latency=LatencyConfig(),
            policy_params=PolicyParams(queue_base=0.05, beta=8.0, preemption=False),
        )
        runs[ff] = simulate(programs, config, "plas")
    assert [dataclasses.astuple(r) for r in runs[True].calls] == [dataclasses.astuple(r) for r in runs[False].calls]
    assert runs[True].stats["coasted_steps"] > 0


def test_preemption_that_recomputes_calls_before_their_first_token_is_reported_as_a_livelock():
    # One sequence slot, 16-token chunks, 0.1 s steps and a 0.05 s quantum:
    # each call is demoted after one chunk and the other (promoted at once
    # with beta=0.5) displaces it, and recompute discards the chunk. With no
    # preemption limit neither ever finishes its prefill.
    programs = [prog("A", 0.0, call("a", 118, 5)), prog("B", 0.0, call("b", 54, 7))]
    loose = PolicyParams(queue_base=0.05, beta=0.5, preempt_limit=None)
    chunked = dict(latency=0.1, max_num_batched_tokens=16, enable_chunked_prefill=True)
    # 100 x 172 live tokens, in 16-token steps: the 1,076th step, which starts at 107.5 s.
    with pytest.raises(SimulationError, match=r"engine 0 livelocked at t=107\.500 s: it computed 17216 prompt tokens.*"
                       r"2 live calls' 172 tokens.*set policy_params\.preempt_limit to an integer"):
        simulate(programs, cfg(loose, **chunked), "plas")
    # The same case finishes with the default limit, or with swap, which keeps the chunks.
    limited = simulate(programs, cfg(PolicyParams(queue_base=0.05, beta=0.5), **chunked), "plas")
    assert {(r.call_id, r.preemptions) for r in limited.calls} == {("a", 1), ("b", 1)}
    swapped = simulate(programs, cfg(loose, preemption_mode="swap", **chunked), "plas")
    assert len(swapped.calls) == 2 and all(r.preemptions > 1 for r in swapped.calls)


def test_ids_with_slashes_do_not_collide_in_the_scheduler_core():
    """Program 'a/b' call 'c' and program 'a' call 'b/c' both read 'a/b/c' when joined with '/'."""
    from sim.sim_call import core_call_id

    progs = [Program("a/b", 0.0, "w", (Call("c", (), 10, 5),)), Program("a", 0.0, "w", (Call("b/c", (), 10, 5),)),
             Program("a\\", 0.0, "w", (Call("/c", (), 10, 5),))]
    result = simulate(progs, cfg(), "fcfs")
    assert sorted((r.program_id, r.call_id) for r in result.calls) == [("a", "b/c"), ("a/b", "c"), ("a\\", "/c")]
    ids = {core_call_id(p.id, p.calls[0].id) for p in progs}
    assert len(ids) == 3 and core_call_id("p0", "c1") == "p0/c1"  # generated ids unchanged


def test_a_call_that_never_waits_has_waiting_exactly_zero():
    """Float rounding of arrival + steps - service gave -2.8e-14 s; a negative waiting share in
    summary.json then made `sim plot` refuse the sweep table it was written into."""
    from pathlib import Path

    from sim.experiments import resolve

    cfg = resolve("quickstart", Path(__file__).resolve().parent.parent / "experiments.yaml", [])
    program = Program(id="p34", arrival=254.693, workload="azure",
                      calls=[Call(id="c0", parents=[], prompt_tokens=325, output_tokens=285, delay=0.0)])
    result = simulate([program], cfg, "fcfs")
    (call,), (prog,) = result.calls, result.programs
    assert call.first_scheduled == call.arrival  # an idle engine takes it at once
    assert call.waiting == 0.0 and prog.waiting == 0.0 and prog.waiting_share == 0.0


def test_aborting_a_lazily_accounted_decode_is_refused_not_miscounted():
    """Aborts come from sim serve, which observes every step and so runs the per-step path. On the lazy
    path a member skipped from the step in flight would settle one token short, so abort refuses it."""
    import simpy

    from sim.core import ProcessTable, SchedulerCore, make_policy
    from sim.kvcache import KVCache
    from sim.latency.base import ConstantLatency
    from sim.replica import Replica
    from sim.sim_call import SimCall

    def started(on_progress):
        env = simpy.Environment()
        eng = EngineConfig()
        core = SchedulerCore(make_policy("fcfs", PolicyParams()), ProcessTable(PolicyParams().program_ttl))
        replica = Replica(env, 0, eng, ConstantLatency(0.01), core, KVCache(1000, eng.block_size, True),
                          1, 1.0, on_finish=lambda call: None, on_progress=on_progress)
        keys = tuple(range(100, 100 + 70 // eng.block_size))  # one per full block of prompt + output
        call = SimCall("p", "c", prompt_tokens=20, output_tokens=50, keys=keys, done=None, arrival=0.0)
        replica.submit(call)
        env.run(until=0.1)  # prefilled, sampled, decoding: ten steps in
        return replica, call

    lazy, call = started(None)
    assert call.steady
    with pytest.raises(RuntimeError, match="needs the per-step path"):
        lazy.abort(call)
    waiting = SimCall("p2", "c", prompt_tokens=20, output_tokens=50, keys=call.keys, done=None, arrival=0.1)
    lazy.submit(waiting)
    with pytest.raises(RuntimeError, match="needs the per-step path"):  # whatever the call's state
        lazy.abort(waiting)
    observed, call = started(lambda call, new, sampled: None)
    assert not call.steady and observed.abort(call) and call not in observed.running
