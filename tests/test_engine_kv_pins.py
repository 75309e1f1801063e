"""KV pins (the ``kv_ttl`` tag) in the plugin, inside vLLM's real v1 Scheduler on a CPU.

The hand cases use blocks of 16 tokens, 8 of them unless a case says
otherwise (7 usable: vLLM keeps one as the null block), and mirror the
simulator's pin cases in `test_sim_engine.py`.
Each clock step is 1 s. Request ``r`` (16-token prompt, long decode) keeps
the engine busy holding 2 blocks. Program A's first call ``a1`` has a
64-token prompt and one output token: at finish it owns 4 full, hashed
blocks, which a pin keeps. Its follow-up ``a2`` re-sends those 64 tokens
plus the sampled token and 15 more (80 tokens, 5 blocks).
"""

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.testing import SAMPLED_TOKEN, FakeClock, make_request, make_scheduler, step, write_tiny_model
from test_engine_plugin import Pipelined

A1 = list(range(100, 164))
A2 = A1 + [SAMPLED_TOKEN] + list(range(200, 215))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def engine(model_dir, policy, **kw):
    clock = FakeClock()
    s = make_scheduler(model_dir, policy=policy, **{"max_num_seqs": 4, "num_blocks": 8, **kw})
    s.clock = clock
    return s, clock


def call(rid, program, prompt, max_tokens, kv_ttl=None, **extra):
    tags = {"program_id": program, **extra}
    if kv_ttl is not None:
        tags["kv_ttl"] = kv_ttl
    return make_request(rid, prompt, max_tokens, extra_args=tags)


def free(s):
    return s.kv_cache_manager.block_pool.get_num_free_blocks()


def start_busy_engine_with_pinned_a1(s, clock, kv_ttl):
    """r runs; a1 finishes at t=2 and (with a TTL) pins its 4 blocks."""
    s.add_request(call("r", "R", list(range(500, 516)), 60))
    step(s, clock, 1.0)
    s.add_request(call("a1", "A", A1, 1, kv_ttl=kv_ttl))
    step(s, clock, 1.0)
    assert "a1" not in s.requests and clock.now == 2.0


def first_scheduled(s, clock, rids, first):
    """Fill ``first`` with (step start, tokens) of each request's first step; runs until all finished."""
    while any(rid in s.requests for rid in rids):
        start = clock.now
        out = step(s, clock, 1.0)
        assert not out.preempted_req_ids
        for rid in rids:
            if rid in out.num_scheduled_tokens:
                first.setdefault(rid, (start, out.num_scheduled_tokens[rid]))
        assert clock.now < 40


@pytest.mark.parametrize(
    "policy, kv_ttl, b_first, a2_first",
    [
        # Without a pin B (96 tokens, 6 blocks) is admitted at t=2: it takes
        # the 5 never-used blocks and evicts a1's tail block, and its decode
        # the next. a2 waits for room and prefills 80 - 32 hit tokens.
        ("program_fcfs", None, (2.0, 96), (4.0, 48)),
        # With the pin 5 blocks are free and r runs, so B waits. Program A
        # arrived first, so a2 goes next: it hits all 64 pinned tokens and
        # takes the pin up; B follows once a2 has finished.
        ("program_fcfs", 10.0, (5.0, 96), (3.0, 16)),
        ("fcfs", None, (2.0, 96), (4.0, 48)),
        # Call-level FCFS: B heads the queue and cannot have the pinned
        # blocks, so both wait for the expiry at 2 + 10 = 12 s (as in the
        # simulator's hand case), and then B evicts the history anyway.
        ("fcfs", 10.0, (12.0, 96), (14.0, 48)),
    ],
)
def test_pin_keeps_the_history_for_the_next_call_only_under_a_program_level_order(
    model_dir, policy, kv_ttl, b_first, a2_first
):
    s, clock = engine(model_dir, policy, num_blocks=12)
    start_busy_engine_with_pinned_a1(s, clock, kv_ttl)
    assert free(s) == (5 if kv_ttl else 9)
    first = {}
    s.add_request(call("b", "B", list(range(300, 396)), 2))
    out = step(s, clock, 1.0)
    if "b" in out.num_scheduled_tokens:
        first["b"] = (2.0, out.num_scheduled_tokens["b"])
    s.add_request(call("a2", "A", A2, 2))
    first_scheduled(s, clock, ["a2", "b"], first)
    assert first == {"b": b_first, "a2": a2_first}
    pins = s.kv_pins
    assert (pins.pinned, pins.taken_up, pins.expired, pins.dropped) == (
        (0, 0, 0, 0) if kv_ttl is None else (1, 1, 0, 0) if policy == "program_fcfs" else (1, 0, 1, 0)
    )


def test_a_sibling_sharing_only_the_common_prefix_does_not_take_the_pin_up(model_dir):
    s, clock = engine(model_dir, "program_fcfs", num_blocks=16)
    start_busy_engine_with_pinned_a1(s, clock, 10.0)
    s.add_request(call("a-sib", "A", A1[:32] + list(range(600, 616)), 2))  # shares 2 of the 4 blocks
    step(s, clock, 1.0)
    assert len(s.kv_pins) == 1 and s.kv_pins.taken_up == 0
    s.add_request(call("a2", "A", A2, 2))
    out = step(s, clock, 1.0)
    assert out.num_scheduled_tokens["a2"] == 16
    assert len(s.kv_pins) == 0 and s.kv_pins.taken_up == 1


def test_a_follow_up_that_hits_another_programs_copy_of_the_history_takes_the_pin_up(model_dir):
    """B's first call sends A's block-aligned prompt: vLLM caps its hit one token short, so B
    recomputes the last block into a second block under the same hash, and B's pin holds that
    copy. B's follow-up hits A's copy; B's history is held all the same."""
    s, clock = engine(model_dir, "program_fcfs", num_blocks=16)
    start_busy_engine_with_pinned_a1(s, clock, 60.0)
    s.add_request(call("b1", "B", A1, 1, kv_ttl=60.0))
    step(s, clock, 1.0)
    assert "b1" not in s.requests and len(s.kv_pins) == 2
    s.add_request(call("b2", "B", A2, 2))
    out = step(s, clock, 1.0)
    assert out.num_scheduled_tokens["b2"] == 16  # a full hit on the 4 blocks
    assert len(s.kv_pins) == 1 and s.kv_pins.taken_up == 1  # B's pin; A's stays for A


def test_no_common_prefix_is_reported_in_the_step_that_takes_the_last_pin_up(model_dir):
    """vLLM counted a2's 4 blocks (ref_cnt 2: a2 and the pin) as common to both running requests,
    though r shares none; the count was zeroed only while pins were still held after the take-up."""
    s, clock = engine(model_dir, "fcfs", num_blocks=16)
    s.add_request(call("a1", "A", A1, 1, kv_ttl=60.0))
    step(s, clock, 1.0)
    assert len(s.kv_pins) == 1
    s.add_request(call("a2", "A", A2, 5))
    s.add_request(call("r", "R", list(range(900, 940)), 5))
    out = step(s, clock, 1.0)
    assert set(out.num_scheduled_tokens) == {"a2", "r"} and len(s.kv_pins) == 0
    assert out.num_common_prefix_blocks == [0]


def test_pins_taken_up_leave_no_expiry_entries_behind(model_dir):
    """As in the simulator (test_serve): with kv_ttl=1e9 the expiry heap kept an entry for every
    request ever pinned, though each pin was taken up by its program's next call. Every program
    sends the same block-aligned prompt, so each first call recomputes its last block (vLLM caps
    a hit one token short) into a duplicate of the cached one, and each follow-up hits the first
    copy: a pin matched by block identity was never taken up after the first program's."""
    s, clock = engine(model_dir, "program_fcfs", num_blocks=64)
    for i in range(200):
        s.add_request(call(f"a{i}", f"P{i}", A1, 1, kv_ttl=1e9))
        while f"a{i}" in s.requests:
            step(s, clock, 1.0)
        s.add_request(call(f"b{i}", f"P{i}", A2, 1))  # re-sends a's history: takes the pin up
        while f"b{i}" in s.requests:
            step(s, clock, 1.0)
        pins = s.kv_pins
        assert len(pins) == 0 and len(pins._expiries) <= 2 * 1 + 64  # compacted as the 67th entry is pushed
    assert (pins.pinned, pins.taken_up) == (200, 200)


def test_a_second_pin_of_one_thread_leaves_the_first_in_place(model_dir):
    # Mirrors test_serve's two-pin case: a later call on the same thread that
    # does not re-send the history takes nothing up, so both pins stay.
    s, clock = engine(model_dir, "fcfs", num_blocks=16)
    start_busy_engine_with_pinned_a1(s, clock, 10.0)
    s.add_request(call("a-next", "A", list(range(300, 332)), 1, kv_ttl=100.0, thread_id="a1"))  # a1's thread
    step(s, clock, 1.0)
    assert "a-next" not in s.requests
    assert (len(s.kv_pins), s.kv_pins.pinned, s.kv_pins.taken_up, s.kv_pins.blocks_held()) == (2, 2, 0, 6)
    clock.now = 12.0
    step(s, clock, 1.0)  # the first pin's expiry passed: released at this schedule
    assert (len(s.kv_pins), s.kv_pins.expired, s.kv_pins.blocks_held()) == (1, 1, 2)


def test_a_running_request_that_must_grow_takes_pinned_memory_instead_of_preempting(model_dir):
    s, clock = engine(model_dir, "fcfs")
    s.add_request(call("r", "R", list(range(500, 530)), 12))  # 30 tokens: 2 blocks, a third at token 33
    step(s, clock, 1.0)
    s.add_request(call("a1", "A", A1, 1, kv_ttl=10.0))
    s.add_request(call("c1", "C", list(range(700, 716)), 1, kv_ttl=10.0))
    step(s, clock, 1.0)
    assert free(s) == 0  # r 2 blocks, pins 4 + 1
    seen = []
    while "r" in s.requests:
        seen.extend(step(s, clock, 1.0).preempted_req_ids)
    # vLLM alone would preempt r, its only running request; the oldest pin
    # (a1's) gives way instead and c1's stays.
    assert seen == []
    assert (s.kv_pins.dropped, len(s.kv_pins), s.kv_pins.blocks_held()) == (1, 1, 1)


def test_an_idle_engine_releases_pins_until_its_best_waiting_call_fits(model_dir):
    s, clock = engine(model_dir, "fcfs")
    s.add_request(call("a1", "A", A1, 1, kv_ttl=10.0))
    s.add_request(call("c1", "C", list(range(700, 716)), 1, kv_ttl=10.0))
    step(s, clock, 1.0)
    assert not s.requests and free(s) == 2
    s.add_request(call("b", "B", list(range(300, 348)), 2))  # needs 3 blocks; nothing runs
    out = step(s, clock, 1.0)
    assert list(out.num_scheduled_tokens) == ["b"]
    assert (s.kv_pins.dropped, len(s.kv_pins)) == (1, 1)  # a1's went, c1's was not needed


def test_plas_takes_pinned_memory_for_a_better_call_before_preempting_a_worse_one(model_dir):
    s, clock = engine(model_dir, "plas", params={"queue_base": 1.0, "num_queues": 4})
    s.add_request(call("r", "R", list(range(500, 516)), 60, program_service=10.0))  # queue 3
    step(s, clock, 1.0)
    s.add_request(call("a1", "A", A1, 1, kv_ttl=10.0))
    step(s, clock, 1.0)
    assert free(s) == 1
    # b is in queue 0 and needs 3 blocks. Without the pin giving way, PLAS
    # would preempt r for it (r frees 2, enough with the 1 free).
    s.add_request(call("b", "B", list(range(300, 348)), 2))
    out = step(s, clock, 1.0)
    assert set(out.num_scheduled_tokens) == {"r", "b"} and not out.preempted_req_ids
    assert (s.kv_pins.dropped, len(s.kv_pins)) == (1, 0)


def test_nothing_is_pinned_without_prefix_caching_and_reset_releases_pins(model_dir):
    s, clock = engine(model_dir, "fcfs", enable_prefix_caching=False)
    s.add_request(call("a1", "A", A1, 1, kv_ttl=10.0))
    step(s, clock, 1.0)
    assert s.kv_pins.pinned == 0 and free(s) == 7
    s, clock = engine(model_dir, "fcfs")
    s.add_request(call("a1", "A", A1, 1, kv_ttl=10.0))
    step(s, clock, 1.0)
    assert len(s.kv_pins) == 1 and free(s) == 3
    assert s.reset_prefix_cache()
    assert len(s.kv_pins) == 0 and free(s) == 7


def test_a_reset_that_a_running_request_blocks_keeps_the_pins(model_dir):
    """vLLM refuses the reset while r holds blocks; releasing the pins then only lost them."""
    s, clock = engine(model_dir, "fcfs")
    start_busy_engine_with_pinned_a1(s, clock, kv_ttl=100.0)
    assert len(s.kv_pins) == 1 and free(s) == 1  # r: 2 blocks, the pin: 4
    assert not s.reset_prefix_cache()
    assert len(s.kv_pins) == 1 and free(s) == 1
    assert s.reset_prefix_cache(reset_running_requests=True)  # preempts r: then only the pin held blocks
    assert len(s.kv_pins) == 0 and free(s) == 7 and [r.request_id for r in s.waiting] == ["r"]


def test_the_give_way_wrapper_is_installed_only_for_steps_that_may_need_it(model_dir):
    # It costs ~0.5 us per allocation (bench_core_decision.py, plugin-plas-pins).
    s, clock = engine(model_dir, "fcfs", num_blocks=256)
    wrapped = lambda: "allocate_slots" in vars(s.kv_cache_manager)  # noqa: E731
    s.add_request(call("r", "R", list(range(500, 516)), 60))
    step(s, clock, 1.0)
    assert not wrapped()  # no pins
    s.add_request(call("a1", "A", A1, 1, kv_ttl=100.0))
    step(s, clock, 1.0)
    step(s, clock, 1.0)
    # A pin is held, but 249 blocks are free: more than r could take in a
    # step (a 512-token budget: 32 blocks, plus 2 per running request).
    assert len(s.kv_pins) == 1 and free(s) == 249 and not wrapped()
    s.add_request(call("big", "B", list(range(2000, 2000 + 3500)), 2))  # 219 blocks
    while s.requests["big"].num_computed_tokens < 3500:  # chunks of 512 tokens
        step(s, clock, 1.0)
    assert free(s) == 30
    step(s, clock, 1.0)  # its first decode step: 30 < 32 + 2 * 2 running
    assert wrapped()
    while "big" in s.requests:
        step(s, clock, 1.0)
    step(s, clock, 1.0)
    assert free(s) > 38 and not wrapped()  # r alone again, with room
    while s.requests:
        step(s, clock, 1.0)
    s.schedule()
    assert wrapped()  # nothing runs: the idle rule may need it
    assert s.reset_prefix_cache() and not wrapped()


def test_a_malformed_kv_ttl_is_refused_with_the_requests_own_tags(model_dir, caplog):
    s, clock = engine(model_dir, "fcfs")
    s.add_request(call("a1", "A", A1, 1, kv_ttl=-1))
    assert "extra_args.kv_ttl must be a finite number of seconds >= 0, got -1" in caplog.text
    step(s, clock, 1.0)
    assert s.kv_pins.pinned == 0


# -- invariants over random chained programs ---------------------------------------------------


def block_references(s):
    """References each block should have: live requests holding it plus pins holding it."""
    refs = {}
    manager = s.kv_cache_manager.coordinator.single_type_managers[0]
    for blocks in manager.req_to_blocks.values():
        for b in blocks:
            if not b.is_null:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
    for pin in s.kv_pins._pins.values():
        for b in pin.blocks[0]:
            refs[b.block_id] = refs.get(b.block_id, 0) + 1
    return refs


@st.composite
def pinned_workloads(draw):
    return {
        "seed": draw(st.integers(0, 10**6)),
        "policy": draw(st.sampled_from(["fcfs", "program_fcfs", "plas", "atlas"])),
        "kv_ttl": draw(st.sampled_from([0.3, 2.0, 20.0])),
        # The longest call reaches 11 blocks (176 tokens), so small caches
        # make pins compete with running calls for memory.
        "num_blocks": draw(st.integers(13, 24)),
        "max_num_seqs": draw(st.integers(1, 4)),
        "async_scheduling": draw(st.booleans()),
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=pinned_workloads())
def test_pins_never_leak_double_count_or_idle_the_engine(model_dir, w):
    rng = random.Random(w["seed"])
    clock = FakeClock()
    s = make_scheduler(
        model_dir, policy=w["policy"], params={"queue_base": 0.5, "num_queues": 4}, max_num_seqs=w["max_num_seqs"],
        max_num_batched_tokens=32, num_blocks=w["num_blocks"], async_scheduling=w["async_scheduling"],
    )
    step_fn = Pipelined() if w["async_scheduling"] else step
    preempt = s._preempt_request

    def preempt_and_check(request, timestamp):
        # Only memory preempts under these orders, and pins give way first.
        if w["policy"] in ("fcfs", "program_fcfs"):
            assert len(s.kv_pins) == 0, "a request was preempted while pins were held"
        preempt(request, timestamp)

    s._preempt_request = preempt_and_check
    s.clock = clock
    pool = s.kv_cache_manager.block_pool
    usable = w["num_blocks"] - 1
    pending = []  # (time, request id, program, prompt, calls left)
    next_token = [10_000]

    def fresh(n):
        next_token[0] += n
        return list(range(next_token[0] - n, next_token[0]))

    for p in range(8):
        pending.append((rng.uniform(0, 2), f"p{p}c0", f"p{p}", fresh(rng.randint(16, 64)), rng.randint(0, 3)))
    live = {}
    steps = 0
    while pending or s.requests:
        for item in sorted(pending):
            if item[0] <= clock.now:
                pending.remove(item)
                _, rid, program, prompt, left = item
                out_tokens = rng.randint(1, 10)
                s.add_request(call(rid, program, prompt, out_tokens, kv_ttl=w["kv_ttl"] if left else None))
                live[rid] = (program, prompt, out_tokens, left)
        if not s.requests:
            clock.advance(0.1)
            continue
        idle_before = not s.running and bool(s.waiting)
        out = step_fn(s, clock, rng.choice([0.05, 0.2, 0.5]))
        steps += 1
        if idle_before:
            assert out.num_scheduled_tokens, "the engine idled with work waiting"
        assert block_references(s) == {b.block_id: b.ref_cnt for b in pool.blocks if b.ref_cnt > 0 and not b.is_null}
        assert free(s) == usable - sum(1 for b in pool.blocks if b.ref_cnt > 0 and not b.is_null)
        for rid in [r for r in live if r not in s.requests]:
            program, prompt, out_tokens, left = live.pop(rid)
            if left:
                n = int(rid.rsplit("c", 1)[1]) + 1
                follow = prompt + [SAMPLED_TOKEN] * out_tokens + fresh(rng.randint(8, 24))
                delay = rng.choice([0.0, 0.2, 1.0, 5.0])
                pending.append((clock.now + delay, f"{program}c{n}", program, follow, left - 1))
        assert steps < 5000
    clock.advance(w["kv_ttl"])
    s.schedule()  # expires what is left
    assert len(s.kv_pins) == 0 and free(s) == usable
    assert s.kv_pins.pinned == s.kv_pins.taken_up + s.kv_pins.expired + s.kv_pins.dropped


def test_many_decodes_crossing_a_block_boundary_at_once_take_pinned_memory_too(model_dir):
    # The wrapper's bound must count a block per running request, not only
    # the token budget: four decodes need four new blocks in one step while
    # a 32-token budget covers two. 10 blocks: the null block, a pin of 2,
    # one per running request, 3 free.
    s, clock = engine(model_dir, "fcfs", num_blocks=10, max_num_batched_tokens=32)
    s.add_request(call("p", "P", list(range(900, 932)), 1, kv_ttl=100.0))
    step(s, clock, 1.0)
    assert len(s.kv_pins) == 1 and free(s) == 7
    for rid, start in (("a", 100), ("b", 200)):
        s.add_request(call(rid, rid.upper(), list(range(start, start + 14)), 8))
    step(s, clock, 1.0)  # a, b prefill 14 tokens
    for rid, start in (("c", 300), ("d", 400)):
        s.add_request(call(rid, rid.upper(), list(range(start, start + 15)), 8))
    step(s, clock, 1.0)  # a, b decode; c, d prefill 15: all four are at 16 tokens
    step(s, clock, 1.0)  # all four compute token 16, the last slot of their first block
    assert free(s) == 3
    out = step(s, clock, 1.0)  # all four need a second block
    assert set(out.num_scheduled_tokens) == {"a", "b", "c", "d"} and not out.preempted_req_ids
    assert (s.kv_pins.dropped, len(s.kv_pins)) == (1, 0)


def test_a_call_ended_by_a_stop_string_keeps_its_pin(model_dir):
    """vLLM's frontend ends a stop-string match with an abort (the engine core cannot tell it
    from a disconnect). The plugin already charged such a call as finished, but pinned only
    calls that completed in the core, so a tagged call stopped by a string lost its history."""
    from vllm.v1.request import RequestStatus

    s, clock = engine(model_dir, "program_fcfs", num_blocks=12)
    s.add_request(call("r", "R", list(range(500, 516)), 60))
    s.add_request(call("a1", "A", A1, 20, kv_ttl=10.0))
    step(s, clock, 1.0)
    step(s, clock, 1.0)  # a1 has decoded: it was served
    assert s.core.calls["a1"].service > 0
    s.finish_requests("a1", RequestStatus.FINISHED_ABORTED)  # as the engine core does for a stop string
    assert (s.kv_pins.pinned, "a1" in s.core.calls) == (1, False)
    held = free(s)
    s.add_request(call("a2", "A", A2, 2))
    out = step(s, clock, 1.0)
    assert out.num_scheduled_tokens.get("a2") == len(A2) - 64  # the pinned 64 tokens hit
    assert s.kv_pins.taken_up == 1 and free(s) <= held
