"""The program-aware scheduler plugin inside vLLM's real v1 Scheduler, on a CPU.

No mocks of vLLM: `engine.testing` builds vLLM 0.26.0's own scheduler from
configs (tiny local Llama config, CPU device, a KV cache config) and fakes
only the model runner's output. Times come from an injected fake clock.
"""

import random
from collections import defaultdict

import pytest
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output.backend_types import StructuredOutputGrammar

from engine.plugin_config import PluginConfigError
from engine.scheduler import ProgramAwareAsyncScheduler, ProgramAwareScheduler, encode_key
from engine.testing import FakeClock, fake_output, make_request, make_scheduler, step, write_tiny_model
from sim.core import PolicyParams, ProcessTable, SchedulerCore, TokenBudget, attribute_service, make_policy

QUEUES = {"queue_base": 1.0, "num_queues": 4}  # bounds 1, 2, 4, inf seconds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def plugin(model_dir, clock, **kw):
    s = make_scheduler(model_dir, **kw)
    s.clock = clock
    return s


_next_token = [1000]


def req(rid, program=None, tokens=20, max_tokens=4, service=None, thread=None, kv_ttl=None, total=None, **kw):
    """A request with a prompt of fresh token ids (no accidental prefix sharing)."""
    extra = {} if kv_ttl is None else {"kv_ttl": kv_ttl}
    if program is not None:
        extra["program_id"] = program
    if service is not None:
        extra["program_service"] = service
    if total is not None:
        extra["program_total_service"] = total
    if thread is not None:
        extra["thread_id"] = thread
    start = _next_token[0]
    _next_token[0] += tokens
    prompt = [start + i for i in range(tokens)]
    return make_request(rid, prompt, max_tokens, extra_args=extra, **kw)


def session_chunk(prompt, max_tokens, rid="sess", extra=None, resumable=True):
    """One input chunk of a streaming session (a resumable request; vLLM 0.26.0's streaming input)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args={"program_id": "S"} if extra is None else extra)
    return Request(rid, prompt, params, None, resumable=resumable, block_hasher=get_request_block_hasher(16, sha256))


def scheduled(out):
    return list(out.num_scheduled_tokens)


def run_until_done(s, clock, rid, seconds):
    while rid in s.requests:
        step(s, clock, seconds)


# -- ordering ------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, first", [("plas", "b0"), ("atlas", "b0"), ("fcfs", "a1")])
def test_program_with_less_attained_service_is_scheduled_first(model_dir, policy, first):
    clock = FakeClock()
    s = plugin(model_dir, clock, policy=policy, params=QUEUES, max_num_seqs=1)
    s.add_request(req("a0", "A", max_tokens=2))
    run_until_done(s, clock, "a0", 1.5)  # prefill+first token, one decode: 3 s of service
    assert s.core.table.programs["A"].total_service == pytest.approx(3.0)
    s.add_request(req("a1", "A"))  # A's next call: program priority 3 s -> queue 2
    clock.advance(0.1)
    s.add_request(req("b0", "B"))  # a new program, later: queue 0
    assert scheduled(step(s, clock, 0.1)) == [first]


@pytest.mark.parametrize("policy, first", [("fcfs", "b0"), ("program_fcfs", "a1")])
def test_program_fcfs_lets_the_older_programs_later_call_go_first(model_dir, policy, first):
    clock = FakeClock()
    s = plugin(model_dir, clock, policy=policy, max_num_seqs=1)
    s.add_request(req("a0", "A", max_tokens=2))
    assert scheduled(step(s, clock, 0.1)) == ["a0"]
    s.add_request(req("b0", "B"))  # waits: the one slot is A's
    run_until_done(s, clock, "a0", 0.1)
    clock.advance(0.5)  # A's tool time
    s.add_request(req("a1", "A"))  # after B's call, but A is the older program
    assert scheduled(step(s, clock, 0.1)) == [first]
    assert s.requests[first].priority == encode_key(s.core.calls[first].key)


def test_untagged_requests_are_single_call_programs(model_dir):
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas")
    s.add_request(req("x"))
    call = s.core.calls["x"]
    assert (call.program_id, call.thread_id) == ("x", "x")
    assert s.requests["x"].priority == encode_key(call.key)


def test_gateway_service_seeds_the_program_entry(model_dir):
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=1)
    s.add_request(req("a", "A", service=3.0))
    s.add_request(req("b", "B", service=0.5))
    entry = s.core.table.programs["A"]
    assert (entry.service, entry.total_service) == (3.0, 3.0)
    assert (s.core.calls["a"].queue, s.core.calls["b"].queue) == (2, 0)
    assert scheduled(step(s, clock, 0.1)) == ["b"]
    # A lower gateway value never lowers what the engine already knows.
    s.add_request(req("a2", "A", service=1.0, thread="t2"))
    assert s.core.table.programs["A"].service == 3.0


def test_the_gateways_total_service_seeds_t_program_apart_from_the_priority(model_dir):
    """Under ATLAS the priority is the critical path and T_program the sum; the plugin
    took the priority for both, so the program's calls counted as starved early."""
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="atlas", params=QUEUES)
    s.add_request(req("a", "A", service=3.0, total=7.5))
    s.add_request(req("z", "Z", total=2.0))  # a total alone raises T_program only
    assert (s.core.table.programs["A"].service, s.core.table.programs["A"].total_service) == (3.0, 7.5)
    assert (s.core.table.programs["Z"].service, s.core.table.programs["Z"].total_service) == (0.0, 2.0)
    s.add_request(req("a2", "A", service=1.0, total=1.0, thread="t2"))
    assert (s.core.table.programs["A"].service, s.core.table.programs["A"].total_service) == (3.0, 7.5)


# -- preemption ----------------------------------------------------------------------------
def test_better_waiting_call_displaces_running_one_at_max_num_seqs(model_dir):
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=1)
    s.add_request(req("a", "A", service=10.0, max_tokens=50))
    assert scheduled(step(s, clock, 0.1)) == ["a"]
    s.add_request(req("b", "B", max_tokens=5))
    out = step(s, clock, 0.1)
    assert scheduled(out) == ["b"]
    assert out.preempted_req_ids == {"a"}
    a = s.requests["a"]
    assert a.status == RequestStatus.PREEMPTED and a.num_computed_tokens == 0
    assert [r.request_id for r in s.waiting] == ["a"] and [r.request_id for r in s.running] == ["b"]
    assert not s.core.calls["a"].running and s.core.calls["b"].running

    # vLLM's own priority mode, same priorities: the better request waits.
    v = make_scheduler(model_dir, scheduler_cls=Scheduler, scheduling_policy="priority", max_num_seqs=1)
    v.add_request(req("a", max_tokens=50, priority=5))
    step(v)
    v.add_request(req("b", max_tokens=5, priority=0))
    out = step(v)
    assert scheduled(out) == ["a"] and not out.preempted_req_ids
    assert [r.request_id for r in v.waiting] == ["b"]


def test_better_waiting_call_displaces_running_one_when_kv_is_short(model_dir):
    # 8 blocks of 16 tokens, one reserved by vLLM as the null block: 7 usable.
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=4, num_blocks=8)
    s.add_request(req("a", "A", tokens=64, service=10.0, max_tokens=40))
    step(s, clock, 0.1)
    step(s, clock, 0.1)  # a holds 5 blocks (65 tokens): 2 free
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == 2
    s.add_request(req("b", "B", tokens=48, max_tokens=5))  # needs 3 blocks
    out = step(s, clock, 0.1)
    assert scheduled(out) == ["b"] and out.preempted_req_ids == {"a"}

    v = make_scheduler(model_dir, scheduler_cls=Scheduler, scheduling_policy="priority", max_num_seqs=4, num_blocks=8)
    v.add_request(req("a", tokens=64, max_tokens=40, priority=5))
    step(v)
    step(v)
    v.add_request(req("b", tokens=48, max_tokens=5, priority=0))
    out = step(v)
    assert scheduled(out) == ["a"] and not out.preempted_req_ids


def test_fcfs_never_preempts_for_priority(model_dir):
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="fcfs", max_num_seqs=1)
    s.add_request(req("a", "A", service=10.0, max_tokens=10))
    step(s, clock, 0.1)
    s.add_request(req("b", "B"))
    out = step(s, clock, 0.1)
    assert scheduled(out) == ["a"] and not out.preempted_req_ids


# -- service accounting --------------------------------------------------------------------
def test_service_is_the_sum_of_the_steps_a_call_was_scheduled_in(model_dir):
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=2, max_num_batched_tokens=32)
    for rid in "abc":
        s.add_request(req(rid, rid.upper(), tokens=40, max_tokens=6))
    durations = [0.3, 0.05, 1.2, 0.7, 0.01, 0.4, 2.0, 0.15, 0.9, 0.6, 0.2, 0.35, 0.5, 0.25, 0.8]
    expected = defaultdict(float)
    for d in durations:
        clock.advance(0.5)  # idle time between steps is not service
        out = step(s, clock, d)
        for cid, seconds in attribute_service(d, scheduled(out)).items():
            expected[cid] += seconds
    assert len(expected) == 3  # everyone ran at some point
    for cid, total in expected.items():
        if cid in s.core.calls:
            assert s.core.calls[cid].service == pytest.approx(total)
        else:  # finished: its program holds the service
            assert s.core.table.programs[cid.upper()].total_service == pytest.approx(total)
    assert any(cid not in s.core.calls for cid in expected), "no call finished"


def test_async_steps_that_overlap_are_charged_once(model_dir):
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", async_scheduling=True, max_num_seqs=2)
    assert isinstance(s, ProgramAwareAsyncScheduler)
    s.add_request(req("a", "A", max_tokens=10))
    first = s.schedule()  # t = 0
    clock.advance(0.1)
    second = s.schedule()  # t = 0.1, while the first step executes
    clock.advance(0.9)
    s.update_from_output(first, fake_output(s, first))  # t = 1.0: first step took 1.0
    clock.advance(0.5)
    s.update_from_output(second, fake_output(s, second))  # t = 1.5: second ran from 1.0
    assert scheduled(first) == scheduled(second) == ["a"]
    assert s.core.calls["a"].service == pytest.approx(1.5)


# -- anti-starvation -----------------------------------------------------------------------
@pytest.mark.parametrize("beta, promoted", [(2.0, True), (100.0, False)])
def test_starving_call_is_promoted_at_its_deadline_and_scheduled(model_dir, beta, promoted):
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params={**QUEUES, "beta": beta}, max_num_seqs=1)
    s.core_log = []
    s.add_request(req("b", "B", max_tokens=40))  # fresh: Q1, demoted as it is served, to Q4 at 4 s
    s.add_request(req("a", "A", service=4.0, max_tokens=2))  # Q4; (W_p + W_c) / (T_p + T_c) >= 2 at t = 8
    deadline = 2.0 * 4.0
    while clock.now < deadline:
        assert scheduled(step(s, clock, 0.5)) == ["b"]
    out = step(s, clock, 0.5)  # schedules at t = 8
    promotions = [e for e in s.core_log if e[0] == "promote" and e[2]]
    if promoted:
        assert scheduled(out) == ["a"] and out.preempted_req_ids == {"b"}
        assert promotions == [("promote", deadline, ["a"])]
    else:
        assert scheduled(out) == ["b"] and promotions == []


# -- lifecycle -----------------------------------------------------------------------------
def test_abort_charges_the_service_received_and_drops_a_call_that_got_none(model_dir):
    # vLLM's frontend ends a call on a stop string by aborting it in the
    # engine core, so an abort after service is charged like a completion.
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=1)
    s.add_request(req("a", "A", max_tokens=10))
    s.add_request(req("w", "A", thread="t2"))
    step(s, clock, 1.5)
    s.finish_requests(["a", "w"], RequestStatus.FINISHED_ABORTED)
    entry = s.core.table.programs["A"]
    assert s.core.calls == {} and not entry.live
    assert entry.service == entry.total_service == pytest.approx(1.5)  # a's step; w never ran
    assert entry.total_waiting == 0.0
    s.add_request(req("b", "A"))
    assert s.core.calls["b"].queue == 1  # 1.5 s of service: between the 1 s and 2 s bounds


def test_an_abort_during_a_step_is_charged_that_step_so_far(model_dir):
    """vLLM's engine core takes aborts between a step's schedule() and its
    update_from_output() (EngineCore.step). The call left the core before
    its step was charged: a ran 0.5 + 2 s but was charged 0.5, and b,
    aborted in its first step, was dropped as if it never ran."""
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=4)
    s.add_request(req("a", "A", max_tokens=50))
    step(s, clock, 0.5)
    out = s.schedule()
    mro = fake_output(s, out)
    clock.advance(2.0)
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)  # while the step runs
    s.update_from_output(out, mro)
    assert s.core.table.programs["A"].total_service == pytest.approx(2.5)
    s.add_request(req("b", "B", tokens=100, max_tokens=50))
    out = s.schedule()
    mro = fake_output(s, out)
    clock.advance(1.0)
    s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    s.update_from_output(out, mro)
    assert s.core.table.programs["B"].total_service == pytest.approx(1.0) and s.core.calls == {}
    # between steps nothing is in flight: an abort adds nothing
    s.add_request(req("c", "C", max_tokens=50))
    step(s, clock, 0.25)
    clock.advance(3.0)
    s.finish_requests(["c"], RequestStatus.FINISHED_ABORTED)
    assert s.core.table.programs["C"].total_service == pytest.approx(0.25)


def test_a_policy_victim_sits_out_the_step_that_preempted_it(model_dir):
    # The waiting call shares a's 96-token prefix, so it needs far fewer new
    # blocks than the victim search assumes; the victim's freed blocks and
    # seat must still not readmit it in the same step. Under async
    # scheduling that readmission duplicated its in-flight token.
    for async_scheduling, step_fn in ((False, step), (True, Pipelined())):
        clock = FakeClock()
        s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=4, num_blocks=16,
                   async_scheduling=async_scheduling)
        prefix = list(range(500, 596))
        s.add_request(make_request("a", prefix + [1, 2, 3, 4], 60, extra_args={"program_id": "A"}))
        s.add_request(make_request("v", list(range(700, 740)), 60,
                                   extra_args={"program_id": "V", "program_service": 10.0}))
        for _ in range(3):
            step_fn(s, clock, 0.05)
        s.add_request(make_request("w", prefix + [9] * 8, 5, extra_args={"program_id": "W"}))
        out = step_fn(s, clock, 0.05)
        assert out.preempted_req_ids == {"v"}
        assert "v" not in out.num_scheduled_tokens and [d.req_id for d in out.scheduled_new_reqs] == ["w"]
        assert s.requests["v"].status == RequestStatus.PREEMPTED and s.core.calls["v"].preemptions == 1
        for _ in range(200):  # everything then runs to completion, v's tokens once each
            if not s.requests:
                break
            step_fn(s, clock, 0.05)
        assert not s.requests and s.core.calls == {}


def test_no_policy_victim_while_vllm_is_paused(model_dir):
    # pause_generation(mode="wait") drains the running requests and admits
    # none: a victim would be evicted for nothing and the drain cut short.
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=1)
    s.add_request(req("a", "A", max_tokens=50, service=10.0))
    step(s, clock, 0.1)
    s.set_pause_state(PauseState.PAUSED_NEW)
    s.add_request(req("b", "B"))
    out = step(s, clock, 0.1)
    assert scheduled(out) == ["a"] and not out.preempted_req_ids
    assert s.get_num_unfinished_requests() == 1
    s.set_pause_state(PauseState.UNPAUSED)
    out = step(s, clock, 0.1)
    assert out.preempted_req_ids == {"a"} and scheduled(out) == ["b"]


def test_each_chunk_of_a_streaming_input_session_is_one_call(model_dir):
    # A resumable request generates for a chunk, stops, and waits out of
    # vLLM's running list for the client's next chunk. The chunk's call
    # completes there and is charged; the next chunk is a new call.
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=4)

    def chunk(prompt, resumable=True):
        return session_chunk(prompt, 3, resumable=resumable)

    s.add_request(chunk(list(range(100, 120))))
    for _ in range(3):
        step(s, clock, 0.5)
    session, entry = s.requests["sess"], s.core.table.programs["S"]
    assert session.status == RequestStatus.WAITING_FOR_STREAMING_REQ and session not in s.running
    assert s.core.calls == {} and entry.total_service == pytest.approx(1.5)
    clock.advance(10.0)  # the client's own time: not waiting, no starvation
    s.add_request(chunk(list(range(300, 310))))
    second = s.core.calls["sess"]
    assert second.queue == 1 and not second.running  # 1.5 s attained: between the 1 s and 2 s bounds
    step(s, clock, 0.5)
    assert second.running
    for _ in range(2):
        step(s, clock, 0.5)
    s.add_request(chunk([], resumable=False))  # the client closes the session
    assert "sess" not in s.requests and s.core.calls == {}
    assert entry.total_service == pytest.approx(3.0) and entry.total_waiting == pytest.approx(0.0)


class _CompiledGrammar(StructuredOutputGrammar):
    """A structured-output grammar that has compiled and accepts every token."""

    def accept_tokens(self, request_id, tokens):
        return True

    def validate_tokens(self, tokens):
        return tokens

    def is_terminated(self):
        return False

    def rollback(self, num_tokens):
        pass

    def fill_bitmask(self, bitmask, idx):
        pass

    def reset(self):
        pass


@pytest.mark.parametrize("grammar", ["compiled", "compiling", "none"])
def test_a_structured_output_request_set_aside_by_vllm_can_take_a_victim(model_dir, grammar):
    """vLLM parks such a request in skipped_waiting and promotes it only when its waiting pass
    reaches it, which it never does while every seat is taken: the victim search, which looked at
    the waiting heap alone, left it behind a worse running call for good."""
    from concurrent.futures import Future

    from vllm.sampling_params import StructuredOutputsParams

    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=1)
    s.add_request(req("b", "B", max_tokens=50, service=10.0))
    step(s, clock, 0.1)
    params = SamplingParams(max_tokens=3, ignore_eos=True, structured_outputs=StructuredOutputsParams(regex="[0-9]+"),
                            extra_args={"program_id": "X"})
    x = Request("x", list(range(400, 420)), params, None, block_hasher=get_request_block_hasher(16, sha256))
    if grammar == "compiled":
        x.structured_output_request.grammar = _CompiledGrammar()
    elif grammar == "compiling":
        x.structured_output_request.grammar = Future()
    s.add_request(x)
    assert x in list(s.skipped_waiting) and s.core.calls["x"].key < s.core.calls["b"].key
    out = step(s, clock, 0.1)
    if grammar == "compiled":
        assert out.preempted_req_ids == {"b"} and scheduled(out) == ["x"]
        run_until_done(s, clock, "x", 0.1)
    else:  # not admissible yet: no victim is evicted for it
        assert not out.preempted_req_ids and scheduled(out) == ["b"]


def _session_waiting_beside_b(model_dir, first_tokens: int, b_tokens: int):
    """PLAS on a 15-block cache: a streaming session's first chunk of ``first_tokens`` runs (it then
    waits for its client, keeping its KV), and a worse call ``b`` of ``b_tokens`` is running beside it."""
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=4, num_blocks=15,
               max_num_batched_tokens=512)
    s.add_request(session_chunk(list(range(100, 100 + first_tokens)), 2))
    for _ in range(2):
        step(s, clock, 0.1)
    s.add_request(req("b", "B", tokens=b_tokens, max_tokens=50, service=10.0))
    step(s, clock, 0.1)
    return s, clock


def test_a_streaming_sessions_next_chunk_can_take_a_victim(model_dir):
    """The next chunk of a session that waited for its client is WAITING but stays in skipped_waiting.

    The KV cache is short here, so the chunk fits only if the worse running
    call gives way: it never did.
    """
    s, clock = _session_waiting_beside_b(model_dir, first_tokens=20, b_tokens=160)
    s.add_request(session_chunk(list(range(400, 480)), 2))  # 80 tokens: 5 blocks beyond the 2 it holds
    session = s.requests["sess"]
    assert session in list(s.skipped_waiting) and session.status == RequestStatus.WAITING
    assert s.core.calls["sess"].key < s.core.calls["b"].key
    assert s._blocks_needed(s.core.calls["sess"]) > s.kv_cache_manager.block_pool.get_num_free_blocks()
    out = step(s, clock, 0.1)
    assert out.preempted_req_ids == {"b"} and scheduled(out) == ["sess"]


def test_a_streaming_sessions_next_chunk_needs_no_victim_for_the_blocks_it_holds(model_dir):
    """A session keeps its KV while it waits for its client, and vLLM admits the
    next chunk counting only the blocks it lacks (`get_num_blocks_to_allocate`).
    The victim search counted the whole session: a 4-token chunk after 96
    tokens (7 blocks held) evicted a running call for blocks it never needed."""
    s, clock = _session_waiting_beside_b(model_dir, first_tokens=96, b_tokens=72)
    assert len(s.kv_cache_manager.coordinator.get_blocks("sess")[0]) == 7
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == 2
    s.add_request(session_chunk([300, 301, 302, 303], 2))
    assert s.core.policy.outranks(s.core.calls["sess"], s.core.calls["b"])
    assert s._blocks_needed(s.core.calls["sess"]) == 0
    out = step(s, clock, 0.1)
    assert not out.preempted_req_ids and sorted(scheduled(out)) == ["b", "sess"]


def test_the_victim_search_counts_the_speculative_lookahead(model_dir):
    """vLLM allocates a waiting request's first chunk plus num_lookahead_tokens
    (EAGLE, MTP, draft models). Counted without it, a victim was evicted for
    a call that still did not fit, and both waited while the better call ran."""
    for lookahead, victims in ((0, {"a"}), (4, set())):
        clock = FakeClock()
        s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=4, num_blocks=8,
                   max_num_batched_tokens=512)
        s.num_lookahead_tokens = lookahead  # as Scheduler.__init__ sets it from num_speculative_tokens
        s.add_request(make_request("c", list(range(100, 148)), 40, extra_args={"program_id": "C"}))
        s.add_request(make_request("a", list(range(300, 330)), 40,
                                   extra_args={"program_id": "A", "program_service": 10.0}))
        step(s, clock, 0.1)
        s.add_request(make_request("w", list(range(500, 548)), 5,
                                   extra_args={"program_id": "W", "program_service": 1.5}))
        # 48 tokens: 3 blocks, or 4 with 4 lookahead slots; a's 2 and the 1 free make 3
        assert s._blocks_needed(s.core.calls["w"]) == 3 + (lookahead > 0)
        out = step(s, clock, 0.1)
        assert out.preempted_req_ids == victims
        assert sorted(scheduled(out)) == (["c", "w"] if victims else ["a", "c"])


def test_the_victim_search_counts_prefix_hits_that_admission_takes_from_the_free_blocks(model_dir):
    """Checking only the first chunk (scheduler_reserve_full_isl off), a follow-up call that hits its
    program's 160 cached tokens needs those 10 free cached blocks and 2 fresh ones for its first 32-token
    chunk. The search counted 2 (the chunk, the hit's length ignored), took no victim, and the better call
    failed admission behind the worse one. The simulator's twin: tests/test_sim_engine.py, same name."""
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=4, num_blocks=17,
               max_num_batched_tokens=32)
    s.scheduler_reserve_full_isl = s.scheduler_config.scheduler_reserve_full_isl = False
    history = list(range(100, 260))  # 160 tokens: 10 blocks, cached once h finishes
    s.add_request(make_request("h", history, 1, extra_args={"program_id": "W"}))
    for _ in range(8):
        step(s, clock, 0.1)
    assert "h" not in s.requests
    s.add_request(make_request("v", list(range(700, 764)), 200, extra_args={"program_id": "V",
                                                                           "program_service": 10.0}))
    for _ in range(3):
        step(s, clock, 0.1)
    s.add_request(make_request("w", history + [5] + list(range(900, 940)), 5,
                               extra_args={"program_id": "W", "program_service": 0.0}))
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == 11
    assert s._blocks_needed(s.core.calls["w"]) == 12
    out = step(s, clock, 0.1)
    assert out.preempted_req_ids == {"v"} and scheduled(out) == ["w"]
    assert out.scheduled_new_reqs[0].num_computed_tokens == 160 and out.num_scheduled_tokens["w"] == 32


def test_the_victim_search_counts_lookahead_past_a_prefix_hit_under_full_reservation(model_dir):
    """vLLM's full-sequence check (its default) also checks the first chunk plus the speculative lookahead,
    and the chunk starts past the prefix hit: 176 tokens with 160 cached reach 176 + 4 tokens, 12 blocks.
    Counted from token 0, the 32-token chunk plus lookahead stayed under the sequence's 11 blocks, the
    search took no victim and the better call failed admission behind the worse one."""
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=4, num_blocks=16,
               max_num_batched_tokens=32)
    s.num_lookahead_tokens = 4  # as Scheduler.__init__ sets it from num_speculative_tokens
    assert s.scheduler_config.scheduler_reserve_full_isl
    history = list(range(100, 260))
    s.add_request(make_request("h", history, 1, extra_args={"program_id": "W"}))
    for _ in range(8):
        step(s, clock, 0.1)
    s.add_request(make_request("v", list(range(700, 748)), 200, extra_args={"program_id": "V",
                                                                           "program_service": 10.0}))
    for _ in range(3):
        step(s, clock, 0.1)
    s.add_request(make_request("w", history + list(range(900, 916)), 5,
                               extra_args={"program_id": "W", "program_service": 0.0}))
    assert s.kv_cache_manager.block_pool.get_num_free_blocks() == 11
    assert s._blocks_needed(s.core.calls["w"]) == 12
    out = step(s, clock, 0.1)
    assert out.preempted_req_ids == {"v"} and scheduled(out) == ["w"]


def test_a_policy_victim_is_taken_for_the_budget_a_running_prefill_spends_not_only_for_a_seat(model_dir):
    """vLLM's running pass spends the budget before its waiting pass: with C's long prefill (Q1) taking all
    16 tokens, the search gave D (Q0) the worst call's seat, B (Q3) was preempted for nothing, and D waited
    behind C, which it outranks. The search now frees the budget, as vLLM v0's priority preemption did, and
    gives back a victim taken only for a seat. The simulator's twin: tests/test_sim_engine.py, same name."""
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=2, num_blocks=64,
               max_num_batched_tokens=16)
    s.add_request(make_request("b", list(range(100, 108)), 50, extra_args={"program_id": "B",
                                                                         "program_service": 5.0}))
    step(s, clock, 0.1)
    s.add_request(make_request("c", list(range(200, 400)), 1, extra_args={"program_id": "C",
                                                                        "program_service": 1.5}))
    step(s, clock, 0.1)
    out = step(s, clock, 0.1)
    assert dict(out.num_scheduled_tokens) == {"c": 16}  # C first in key order: B gets no budget
    s.add_request(make_request("d", list(range(500, 505)), 1, extra_args={"program_id": "D",
                                                                        "program_service": 0.0}))
    out = step(s, clock, 0.1)
    assert out.preempted_req_ids == {"c"}
    assert dict(out.num_scheduled_tokens) == {"b": 1, "d": 5}


def test_no_victim_is_taken_for_budget_an_earlier_admitted_chunk_takes_first(model_dir):
    """vLLM's waiting pass gives d's 100-token prompt the 15 tokens b's decode leaves, and would give it
    the one token b's preemption frees too: b was preempted and e still not admitted (a review's case).
    The simulator's twin: tests/test_sim_engine.py, same name."""
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=3, num_blocks=64,
               max_num_batched_tokens=16)
    s.add_request(make_request("b", list(range(100, 108)), 50, extra_args={"program_id": "B",
                                                                         "program_service": 5.0}))
    step(s, clock, 0.1)
    s.add_request(make_request("d", list(range(200, 300)), 1, extra_args={"program_id": "D", "program_service": 0.0}))
    s.add_request(make_request("e", list(range(500, 505)), 1, extra_args={"program_id": "E", "program_service": 0.0}))
    out = step(s, clock, 0.1)
    assert out.preempted_req_ids == set()
    assert dict(out.num_scheduled_tokens) == {"b": 1, "d": 15}


def test_no_victims_are_pieced_together_from_decodes_for_the_budget(model_dir):
    """Four demoted decodes spend 4 of 16 tokens and d's 14-token prompt takes the 12 left: e lacks three.
    Three decodes, one token each, were preempted to start e one step sooner; no single victim covers
    e's lack, so none goes. The simulator's twin: tests/test_sim_engine.py, same name."""
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=6, num_blocks=64,
               max_num_batched_tokens=16)
    for i in range(4):
        s.add_request(make_request(f"b{i}", list(range(100 + 10 * i, 104 + 10 * i)), 50,
                                   extra_args={"program_id": f"B{i}", "program_service": 5.0}))
    step(s, clock, 0.1)
    s.add_request(make_request("d", list(range(200, 214)), 1, extra_args={"program_id": "D", "program_service": 0.0}))
    s.add_request(make_request("e", list(range(500, 505)), 1, extra_args={"program_id": "E", "program_service": 0.0}))
    out = step(s, clock, 0.1)
    assert out.preempted_req_ids == set()
    assert dict(out.num_scheduled_tokens) == {"b0": 1, "b1": 1, "b2": 1, "b3": 1, "d": 12}
    out = step(s, clock, 0.1)
    assert dict(out.num_scheduled_tokens) == {"b0": 1, "b1": 1, "b2": 1, "b3": 1, "d": 2, "e": 5}


def test_duplicate_thread_falls_back_to_the_request_id(model_dir):
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="atlas")
    s.add_request(req("a", "A", thread="t"))
    s.add_request(req("b", "A", thread="t"))
    assert s.core.calls["b"].thread_id == "b"
    # The request id may itself name a live thread: the fallback must not
    # collide (add_request raising would kill vLLM's engine core).
    s.add_request(req("c", "A", thread="d"))
    s.add_request(req("d", "A", thread="t"))
    assert s.core.calls["d"].thread_id == "d#1" and s.core.calls["c"].thread_id == "d"


def test_a_streaming_session_with_its_token_in_flight_is_no_policy_victim(model_dir):
    """Under async scheduling, evicting a session whose stopping token is in flight loses it in vLLM 0.26.0.

    When the token lands the session stops while preempted: vLLM re-queues
    it in _handle_stopped_request, then update_from_output takes it out of
    waiting again, and it is in no queue at all.
    """
    clock = FakeClock()
    s = plugin(model_dir, clock, policy="plas", params=QUEUES, max_num_seqs=1, async_scheduling=True)

    def chunk(rid, prompt, extra, resumable=True):
        return session_chunk(prompt, 1, rid, extra, resumable)

    s.add_request(chunk("S", list(range(100, 120)), {"program_id": "S", "program_service": 10.0}))
    first = s.schedule()  # S prefills; its only token is in flight
    first_out = fake_output(s, first)
    s.add_request(chunk("S", list(range(200, 210)), {"program_id": "S"}))  # the client's next chunk
    s.add_request(req("b", "B", tokens=20, max_tokens=3))  # outranks S (10 s attained)
    second = s.schedule()
    assert not second.preempted_req_ids
    clock.advance(0.1)
    s.update_from_output(first, first_out)
    session = s.requests["S"]
    queued = list(s.running) + list(s.waiting) + list(s.skipped_waiting)
    assert queued.count(session) == 1  # in exactly one queue, not lost
    in_flight = second
    for _ in range(40):  # drain: b and S's second chunk both finish
        out = s.schedule()
        clock.advance(0.1)
        s.update_from_output(in_flight, fake_output(s, in_flight))
        in_flight = out
    s.update_from_output(in_flight, fake_output(s, in_flight))
    assert "b" not in s.requests
    assert session.status == RequestStatus.WAITING_FOR_STREAMING_REQ and s.core.calls == {}
    assert s.core.table.programs["S"].total_service > 10.0  # both chunks were charged


def test_pins_do_not_make_vllm_report_a_prefix_common_to_every_running_request(model_dir):
    """A pin's block reference would make ref_cnt == running requests for a block only some of them hold."""
    results = {}
    for ttl in (None, 60.0):
        clock = FakeClock()
        s = plugin(model_dir, clock, policy="plas", max_num_seqs=4)
        shared = list(range(100, 148))  # 3 full blocks
        extra = {"program_id": "A"} | ({"kv_ttl": ttl} if ttl else {})
        s.add_request(make_request("a0", shared + [1], 1, extra_args=extra))
        while s.requests:
            step(s, clock, 0.1)
        s.add_request(make_request("b0", shared + [2, 3], 5, extra_args={"program_id": "B"}))  # a0's prefix
        s.add_request(make_request("c0", list(range(500, 540)), 5, extra_args={"program_id": "C"}))  # unrelated
        results[ttl] = (len(s.kv_pins), s.schedule().num_common_prefix_blocks)
    assert results[None] == (0, [0])
    assert results[60.0] == (1, [0])  # b0 and c0 share nothing, pin or not


@pytest.mark.parametrize(
    "config, message",
    [
        ({"autellix": {"policy": "srpt"}}, r"'srpt' is an oracle .* Valid choices here: fcfs, mlfq, plas, atlas"),
        ({"autellix": {"policy": "lifo"}}, r"unknown policy 'lifo'; valid choices: fcfs, mlfq, plas, atlas"),
        ({"autellix": {"params": {"beta": 0}}}, r"policy_params.beta: expected > 0"),
    ],
)
def test_bad_configuration_is_refused_when_the_engine_starts(model_dir, config, message):
    with pytest.raises(PluginConfigError, match=message):
        make_scheduler(model_dir, additional_config=config)


def test_policy_and_params_come_from_additional_config(model_dir):
    s = make_scheduler(model_dir, policy="mlfq", params={"mlfq_starve_after": 3.0})
    assert s.core.policy.name == "mlfq" and s.core.policy.params == PolicyParams(mlfq_starve_after=3.0)
    assert type(s) is ProgramAwareScheduler


# -- the simulator's core, fed the same events, decides the same ---------------------------
class Pipelined:
    """Async scheduling as vLLM's batch queue runs it: step N+1 is scheduled before N's update."""

    def __init__(self):
        self.in_flight = None

    def __call__(self, s, clock, seconds):
        out = s.schedule()
        output = (out, fake_output(s, out))  # the runner's answer depends on the state at schedule time
        if self.in_flight is not None:
            clock.advance(seconds)
            s.update_from_output(*self.in_flight)
        self.in_flight = output
        return out


def run_workload(s, clock, seed, parallel, step_fn=step, kv_ttl=None):
    """Programs of chained (or pairwise-parallel) calls with tool time in between.

    With ``kv_ttl`` every call with a follow-up is tagged to pin its KV.
    """
    rng = random.Random(seed)
    pending = []  # (arrival time, request id, program, thread, calls left after this one)
    for p in range(8):
        for t in range(2 if parallel else 1):
            pending.append((rng.uniform(0, 3), f"p{p}t{t}c0", f"p{p}", f"t{t}", rng.randint(1, 3)))
    live = {}
    steps = 0
    while pending or s.requests:
        for item in sorted(pending):
            if item[0] <= clock.now:
                pending.remove(item)
                _, rid, program, thread, left = item
                pin = {"kv_ttl": kv_ttl} if kv_ttl and left else {}
                s.add_request(req(rid, program, tokens=rng.randint(8, 60), max_tokens=rng.randint(2, 30), thread=thread,
                                  **pin))
                live[rid] = (program, thread, left)
        if not s.requests:
            clock.advance(0.1)
            continue
        step_fn(s, clock, rng.choice([0.05, 0.1, 0.2, 0.4]))
        steps += 1
        for rid in [r for r in live if r not in s.requests]:  # finished
            program, thread, left = live.pop(rid)
            if left:
                n = int(rid.rsplit("c", 1)[1]) + 1
                nxt = f"{program}{thread}c{n}"
                pending.append((clock.now + rng.uniform(0, 1), nxt, program, thread, left - 1))
        assert steps < 5000
    return steps


def replay(log, policy, params, max_num_seqs):
    """Feed the plugin's recorded events to a fresh core as the simulator's replica does."""
    p = PolicyParams(**params)
    core = SchedulerCore(make_policy(policy, p), ProcessTable(p.program_ttl))
    running, waiting = {}, {}
    ids = lambda calls: [c.id for c in calls]  # noqa: E731
    for event in log:
        kind = event[0]
        if kind == "add":
            _, cid, program, thread, prompt, now, seed = event
            if seed is not None:
                entry = core.table.get_or_create(program, now)
                entry.service = max(entry.service, seed)
                entry.total_service = max(entry.total_service, seed)
            waiting[cid] = core.add_call(cid, program, thread, prompt, now)
        elif kind == "expire":
            assert core.table.expire(event[1]) == event[2]
        elif kind == "promote":
            assert ids(core.promote_starving(event[1])) == event[2]
        elif kind == "decide":
            (_, now, heap_order, running_order, free_seqs, free_blocks, need, freed, victims,
             budget, chunked, tokens, asked) = event
            # Only admissible requests are logged (not a session awaiting its client, say).
            logged = set(heap_order)
            order_w = [c for c in core.order(waiting.values()) if c.id in logged]
            order_r = core.order(running.values())
            assert ids(order_w) == heap_order, "vLLM's waiting heap is out of the core's order"
            assert ids(order_r) == running_order
            got = core.choose_victims(
                order_r, order_w[:max_num_seqs], free_seqs, free_blocks,
                lambda c: need[c.id], lambda c: freed[c.id],
                TokenBudget(budget, lambda c: asked[c.id], lambda c: tokens[c.id], chunked),
            )
            assert ids(got) == victims
        elif kind == "preempt":
            call = running.pop(event[1])
            core.on_preempted(call, event[2])
            waiting[call.id] = call
        elif kind == "admit":
            call = waiting.pop(event[1])
            core.on_admitted(call)
            running[call.id] = call
        elif kind == "step":
            core.on_step(event[1], event[2])
        elif kind == "finish":  # async: a step's output may finish a call preempted since
            call = running.pop(event[1], None) or waiting.pop(event[1])
            core.finish_call(call, event[2])
        elif kind == "abort":
            call = running.pop(event[1], None) or waiting.pop(event[1])
            core.abort_call(call, event[2])
        else:
            raise AssertionError(f"unknown event {kind}")
    return core


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    "policy, params, parallel, kv_ttl",
    [
        ("plas", {**QUEUES, "beta": 2.0}, False, None),
        ("atlas", {**QUEUES, "beta": 2.0}, True, None),
        ("mlfq", {"mlfq_base_quantum": 0.1, "mlfq_starve_after": 1.5, "num_queues": 4}, False, None),
        ("fcfs", {}, True, None),
        # Pins hold blocks and give way (here before policy victims, too):
        # the core still decides from the free blocks the plugin reports.
        ("plas", {**QUEUES, "beta": 2.0}, False, 0.5),
    ],
)
def test_core_replay_of_the_plugins_events_makes_identical_decisions(
    model_dir, policy, params, parallel, kv_ttl, async_scheduling
):
    clock = FakeClock()
    max_num_seqs = 3
    s = plugin(
        model_dir, clock, policy=policy, params=params, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=48, num_blocks=12, async_scheduling=async_scheduling,
    )
    s.core_log = log = []
    # Seed 8: every case preempts for memory too (with 7, budget-aware victims left MLFQ async none).
    run_workload(s, clock, seed=8, parallel=parallel, step_fn=Pipelined() if async_scheduling else step, kv_ttl=kv_ttl)
    core = replay(log, policy, params, max_num_seqs)
    assert core.calls == s.core.calls == {}
    assert {pid: (e.service, e.total_service, e.total_waiting) for pid, e in core.table.programs.items()} == {
        pid: (e.service, e.total_service, e.total_waiting) for pid, e in s.core.table.programs.items()
    }
    # The workload must exercise what the replay checks.
    kinds = defaultdict(int)
    for e in log:
        kinds[e[0]] += 1
    victims = sum(len(e[8]) for e in log if e[0] == "decide")
    if not kv_ttl:  # with pins, dropping them takes the place of these
        assert kinds["preempt"] > victims, "no preemption for memory"
    if policy != "fcfs":
        assert victims > 0, "no priority preemption"
        assert any(e[2] for e in log if e[0] == "promote"), "no starvation promotion"
    if kv_ttl:
        assert s.kv_pins.pinned > 0 and s.kv_pins.dropped > 0, "no pin gave way"


@pytest.mark.parametrize("name, cls", [("ProgramAwareScheduler", ProgramAwareScheduler),
                                       ("ProgramAwareAsyncScheduler", ProgramAwareAsyncScheduler)])
def test_scheduler_cls_path_resolves_to_the_plugin(name, cls):
    from vllm.config import SchedulerConfig

    config = SchedulerConfig.default_factory(scheduler_cls=f"engine.scheduler.{name}")
    assert config.get_scheduler_cls() is cls


def test_encoded_keys_keep_the_core_order():
    keys = [(0, 5), (0, 7), (1, 1), (1, 2), (3, 0), (7, 2**40)]
    assert sorted(keys, key=encode_key) == sorted(keys)
    assert encode_key((7, 2**40)) < 2**63
    with pytest.raises(OverflowError):
        encode_key((0, 2**48))
