"""The shared scheduler core: policies, starvation, victims, balancers, process table."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.core import (
    ProcessTable,
    SchedulerCore,
    TokenBudget,
    attribute_service,
    make_balancer,
    make_policy,
)
from sim.core.params import PolicyParams


def core(policy, **params):
    p = PolicyParams(**params)
    return SchedulerCore(make_policy(policy, p), ProcessTable(p.program_ttl))


def test_core_imports_only_the_standard_library():
    code = (
        "import sys, sim.core\n"
        "heavy = {'simpy', 'numpy', 'scipy', 'torch', 'vllm', 'matplotlib', 'yaml'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_attribute_service_gives_every_call_the_step():
    assert attribute_service(0.25, ["a", "b"]) == {"a": 0.25, "b": 0.25}


@pytest.mark.parametrize("seconds", [-1.0, float("nan"), float("inf")])
def test_attribute_service_refuses_a_step_that_is_not_a_duration(seconds):
    with pytest.raises(ValueError, match=rf"^step duration must be a finite number >= 0, got {seconds}$"):
        attribute_service(seconds, ["a"])


def test_unknown_policy_names_valid_choices():
    with pytest.raises(ValueError,
                       match=r"^unknown policy 'lifo'; valid choices: fcfs, mlfq, plas, atlas, srpt, program_fcfs$"):
        make_policy("lifo")


def test_fcfs_orders_by_arrival_and_never_preempts_for_priority():
    c = core("fcfs")
    a = c.add_call("A/0", "A", "0", 100, 0.0)
    b = c.add_call("B/0", "B", "0", 100, 1.0)
    assert c.order([b, a]) == [a, b]
    c.on_admitted(a)
    victims = c.choose_victims([a], [b], 0, 0, lambda _: 1, lambda _: 1)
    assert victims == []
    assert c.memory_victim([a, b]) is b  # latest arrival, as vLLM pops its running tail


def test_program_fcfs_orders_by_program_arrival_and_never_preempts_for_priority():
    c = core("program_fcfs")
    a0 = c.add_call("A/0", "A", "0", 100, 0.0)
    b0 = c.add_call("B/0", "B", "0", 100, 1.0)
    c.on_admitted(a0)
    c.on_step({"A/0": 2.0}, 2.0)
    c.finish_call(a0, 2.0)
    # A's second call arrives after B's first: A came first, so it goes first.
    a1 = c.add_call("A/1", "A", "1", 100, 3.0)
    c2 = c.add_call("C/0", "C", "0", 100, 3.5)
    assert c.order([c2, b0, a1]) == [a1, b0, c2]
    assert c.choose_victims([b0], [a1], 0, 0, lambda _: 1, lambda _: 1) == []
    assert c.memory_victim([a1, b0, c2]) is c2  # the newest program's call
    # Never promoted: arrival order needs no anti-starvation.
    assert c.policy.starve_deadline(c2, c.table.programs["C"]) == float("inf")


def test_plas_new_call_enters_queue_of_program_service():
    c = core("plas", queue_base=1.0, num_queues=4)  # bounds 1, 2, 4, inf
    a0 = c.add_call("A/0", "A", "0", 10, 0.0)
    c.on_admitted(a0)
    c.on_step({"A/0": 3.0}, 3.0)  # demoted: 3 s crosses Q1 (1) and Q2 (2)
    assert a0.queue == 2
    c.finish_call(a0, 3.0)
    assert c.table.programs["A"].service == 3.0
    a1 = c.add_call("A/1", "A", "1", 10, 3.0)
    b0 = c.add_call("B/0", "B", "0", 10, 3.5)
    assert a1.queue == 2 and a1.priority == 3.0
    assert b0.queue == 0
    assert c.order([a1, b0]) == [b0, a1]  # less attained service first, despite arriving later


def test_plas_demotion_happens_exactly_at_queue_bound():
    c = core("plas", queue_base=1.0, num_queues=4)
    a = c.add_call("A/0", "A", "0", 10, 0.0)
    c.on_admitted(a)
    c.on_step({"A/0": 0.5}, 0.5)
    assert a.queue == 0
    c.on_step({"A/0": 0.5}, 1.0)
    assert a.queue == 1
    c.on_step({"A/0": 0.9}, 1.9)
    assert a.queue == 1
    c.on_step({"A/0": 0.1}, 2.0)
    assert a.queue == 2


def test_fixed_quantum_demotes_after_quantum():
    c = core("plas", queue_base=1.0, num_queues=4, quantum=0.25)
    a = c.add_call("A/0", "A", "0", 10, 0.0)
    c.on_admitted(a)
    c.on_step({"A/0": 0.25}, 0.25)
    assert a.queue == 1
    c.on_step({"A/0": 0.25}, 0.5)
    assert a.queue == 2


def test_atlas_parallel_siblings_share_the_critical_path_priority():
    plas, atlas = core("plas"), core("atlas")
    for c in (plas, atlas):
        root = c.add_call("P/r", "P", "r", 10, 0.0)
        c.on_step({"P/r": 2.0}, 2.0)
        c.finish_call(root, 2.0)
        kids = [c.add_call(f"P/{k}", "P", k, 10, 2.0) for k in "abc"]
        assert len({k.priority for k in kids}) == 1  # gang: same entry priority
        for k in kids:
            c.on_step({k.id: 1.5}, 3.5)
        for k in kids:
            c.finish_call(k, 3.5)
    # ATLAS keeps the critical path (2 + 1.5); PLAS sums the work (2 + 3 x 1.5).
    assert atlas.table.programs["P"].service == pytest.approx(3.5)
    assert plas.table.programs["P"].service == pytest.approx(6.5)
    # So a late sibling stays in the gang's queue under ATLAS (bounds 1, 2, 4,
    # 8, ...: 3.5 -> Q3) but drops a queue under PLAS (6.5 -> Q4).
    assert atlas.add_call("P/d", "P", "d", 10, 4.0).queue == 2
    assert plas.add_call("P/d", "P", "d", 10, 4.0).queue == 3


def test_mlfq_skip_join_enters_by_prompt_length():
    c = core("mlfq", mlfq_base_quantum=0.05, mlfq_prefill_s_per_token=1e-4, num_queues=6)
    short = c.add_call("A/0", "A", "0", 100, 0.0)  # 0.01 s prefill -> Q1 (0.05)
    long = c.add_call("B/0", "B", "0", 3000, 0.0)  # 0.3 s -> Q4 (0.4)
    assert short.queue == 0 and long.queue == 3


def test_preemptive_victims_only_of_strictly_worse_rank():
    c = core("plas", queue_base=1.0, num_queues=4)
    old = c.add_call("A/0", "A", "0", 10, 0.0)
    c.on_admitted(old)
    c.on_step({"A/0": 5.0}, 5.0)  # now in the last queue
    new = c.add_call("B/0", "B", "0", 10, 5.0)
    peer = c.add_call("C/0", "C", "0", 10, 5.0)
    # One sequence slot, held by `old`: the better-ranked `new` displaces it.
    victims = c.choose_victims([old], [new, peer], 0, 100, lambda _: 1, lambda _: 1)
    assert victims == [old]
    # A waiting call of the same rank does not displace a running one.
    c2 = core("plas")
    x = c2.add_call("X/0", "X", "0", 10, 0.0)
    y = c2.add_call("Y/0", "Y", "0", 10, 0.1)
    c2.on_admitted(x)
    assert c2.choose_victims([x], [y], 0, 100, lambda _: 1, lambda _: 1) == []


def test_victims_are_not_taken_when_they_would_not_make_room():
    c = core("plas", queue_base=1.0, num_queues=4)
    old = c.add_call("A/0", "A", "0", 10, 0.0)
    c.on_admitted(old)
    c.on_step({"A/0": 5.0}, 5.0)
    new = c.add_call("B/0", "B", "0", 10, 5.0)
    # `new` needs 50 blocks; preempting `old` frees only 10 of the 0 free.
    assert c.choose_victims([old], [new], 1, 0, lambda _: 50, lambda _: 10) == []


def _demoted(c, cid, program, served, now):
    call = c.add_call(cid, program, "0", 10, now - served)
    c.on_admitted(call)
    c.on_step({cid: served}, now)
    return call


def test_a_victim_that_frees_no_budget_is_not_taken_for_a_call_the_budget_keeps_out():
    """Both engines schedule the running calls before any waiting one, so a victim taken for a
    seat was wasted while a better-ranked running prefill spent the whole budget."""
    c = core("plas", queue_base=1.0, num_queues=4)  # bounds 1, 2, 4, inf
    decode = _demoted(c, "A/0", "A", 5.0, 5.0)  # Q3, asks 1 token
    prefill = _demoted(c, "C/0", "C", 1.5, 5.0)  # Q1, asks its 184 unscheduled tokens
    new = c.add_call("D/0", "D", "0", 5, 5.0)  # Q0: outranks both
    asked = {"A/0": 1, "C/0": 184}
    budget = TokenBudget(16, lambda r: asked[r.id], lambda w: 5, chunked=True)
    running = [prefill, decode]
    # Without the budget the worst call gives its seat and nothing else is asked.
    assert c.choose_victims(running, [new], 0, 100, lambda _: 1, lambda _: 1) == [decode]
    # With it, the seat alone does not admit D: the prefill must go, and once it is out the
    # decode's preemption is needless (given back).
    assert c.choose_victims(running, [new], 0, 100, lambda _: 1, lambda _: 1, budget) == [prefill]
    # A budget the running calls leave room in asks nothing more than a seat.
    roomy = TokenBudget(2048, lambda r: asked[r.id], lambda w: 5, chunked=True)
    assert c.choose_victims(running, [new], 0, 100, lambda _: 1, lambda _: 1, roomy) == [decode]
    # Without chunked prefill D needs all 5 of its tokens: 185 of 189 asked leaves 4.
    whole = TokenBudget(189, lambda r: asked[r.id], lambda w: 5, chunked=False)
    assert c.choose_victims(running, [new], 1, 100, lambda _: 1, lambda _: 1, whole) == [decode]
    chunk = TokenBudget(189, lambda r: asked[r.id], lambda w: 5, chunked=True)
    assert c.choose_victims(running, [new], 1, 100, lambda _: 1, lambda _: 1, chunk) == []


def test_an_admitted_waiting_call_spends_the_budget_the_next_one_would_need():
    c = core("plas", queue_base=1.0, num_queues=4)
    decode = _demoted(c, "A/0", "A", 5.0, 5.0)
    first = c.add_call("D/0", "D", "0", 10, 5.0)
    second = c.add_call("E/0", "E", "0", 10, 5.0)
    tokens = {"D/0": 10, "E/0": 10}
    # 16 tokens, the decode asks 1: D takes 10, E's chunk gets the last 5; two free seats.
    budget = TokenBudget(16, lambda r: 1, lambda w: tokens[w.id], chunked=True)
    assert c.choose_victims([decode], [first, second], 2, 100, lambda _: 1, lambda _: 1, budget) == []
    # D takes 15 of the 15 left: E has nothing left, and the decode gives back one token.
    tokens["D/0"] = 15
    assert c.choose_victims([decode], [first, second], 2, 100, lambda _: 1, lambda _: 1, budget) == [decode]
    # No chunked prefill: D takes 7 of 15, E needs its 10, and the decode's one makes 9: no victim.
    tokens["D/0"] = 7
    whole = TokenBudget(16, lambda r: 1, lambda w: tokens[w.id], chunked=False)
    assert c.choose_victims([decode], [first, second], 2, 100, lambda _: 1, lambda _: 1, whole) == []


def test_a_chunk_the_budget_cut_short_takes_what_a_victim_gives_back_first():
    """The waiting pass serves calls in order: D's 100 tokens, cut to the 15 left, take first
    whatever the decode's preemption gives back, so E gets none of it. Counting D as spending
    only its 15 preempted the decode for an E that was still not admitted (a review's case)."""
    c = core("plas", queue_base=1.0, num_queues=4)
    decode = _demoted(c, "A/0", "A", 5.0, 5.0)
    first = c.add_call("D/0", "D", "0", 100, 5.0)
    second = c.add_call("E/0", "E", "0", 5, 5.0)
    tokens = {"D/0": 100, "E/0": 5}
    budget = TokenBudget(16, lambda r: 1, lambda w: tokens[w.id], chunked=True)
    assert c.choose_victims([decode], [first, second], 2, 100, lambda _: 1, lambda _: 1, budget) == []
    # Running calls that are no candidates still spend the budget (`fixed`): with the decode's
    # token, 15 of them leave D nothing, so the decode goes even with a seat free; 14 leave one;
    # with 16 the decode's token does not make room at all.
    for fixed, seats, victims in ((15, 0, [decode]), (15, 1, [decode]), (14, 1, []), (16, 1, [])):
        session = TokenBudget(16, lambda r: 1, lambda w: tokens[w.id], chunked=True, fixed=fixed)
        assert c.choose_victims([decode], [first], seats, 100, lambda _: 1, lambda _: 1, session) == victims


def test_for_the_budget_alone_one_victim_must_cover_what_the_call_lacks():
    """A victim's tokens are freed for one step only. Without chunked prefill a prompt three tokens
    short took three one-token decodes, each to recompute or swap (SRPT on the unoptimised engine
    went from 0.998 to 1.170 of FCFS with 5,391 such victims)."""
    c = core("plas", queue_base=1.0, num_queues=4)
    decodes = [_demoted(c, f"A{i}/0", f"A{i}", 5.0, 5.0) for i in range(3)]  # Q3, one token each
    new = c.add_call("D/0", "D", "0", 10, 5.0)
    tokens = {"D/0": 14}
    whole = TokenBudget(16, lambda r: 1, lambda w: tokens[w.id], chunked=False)
    # 13 of 16 left: 14 tokens lack one, which one decode covers; the worst goes.
    assert c.choose_victims(decodes, [new], 1, 100, lambda _: 1, lambda _: 1, whole) == [max(decodes, key=lambda d: d.key)]
    # 15 lack two: no single decode covers them, so none goes.
    tokens["D/0"] = 15
    assert c.choose_victims(decodes, [new], 1, 100, lambda _: 1, lambda _: 1, whole) == []
    # Short of a seat too: the worst decode goes for the seat and gives back its token, which
    # leaves one lacking, and the next covers it. One more token and none covers what is left,
    # so none is taken for the seat either.
    worst_first = sorted(decodes, key=lambda d: d.key, reverse=True)
    assert c.choose_victims(decodes, [new], 0, 100, lambda _: 1, lambda _: 1, whole) == worst_first[:2]
    tokens["D/0"] = 16
    assert c.choose_victims(decodes, [new], 0, 100, lambda _: 1, lambda _: 1, whole) == []


def test_a_candidate_passed_over_for_the_budget_stays_a_victim_for_a_later_seat():
    """D lacks budget only: the worst call, a decode, is passed over for the prefill that covers it.
    E takes the prefill's seat; F then lacks one, and the decode passed over is the worst call left."""
    c = core("plas", queue_base=1.0, num_queues=4)
    decode = _demoted(c, "A/0", "A", 5.0, 5.0)  # Q3, one token
    prefill = _demoted(c, "C/0", "C", 1.5, 5.0)  # Q1, asks 184
    d = c.add_call("D/0", "D", "0", 5, 5.0)
    e = c.add_call("E/0", "E", "0", 5, 5.0)
    f = c.add_call("F/0", "F", "0", 5, 5.0)
    asked = {"A/0": 1, "C/0": 184}
    budget = TokenBudget(16, lambda r: asked[r.id], lambda w: 5, chunked=True)
    running, waiting = [prefill, decode], [d, e, f]
    assert c.choose_victims(running, waiting, 1, 100, lambda _: 1, lambda _: 1, budget) == [prefill, decode]
    # Two seats free: F sits beside the decode.
    assert c.choose_victims(running, waiting, 2, 100, lambda _: 1, lambda _: 1, budget) == [prefill]


def test_a_program_whose_service_sums_to_just_under_a_bound_enters_the_queue_its_call_was_demoted_to():
    # Ten 0.1 s steps sum to 0.9999999999999999: the call is demoted at the
    # 1 s bound, so the program's next call must not enter above it.
    c = core("plas", queue_base=1.0, num_queues=4)
    a = c.add_call("A/0", "A", "0", 10, 0.0)
    c.on_admitted(a)
    now = 0.0
    for _ in range(10):
        now += 0.1
        c.on_step({"A/0": 0.1}, now)
    assert a.queue == 1
    c.finish_call(a, now)
    assert c.table.programs["A"].service < 1.0
    assert c.add_call("A/1", "A", "1", 10, now).queue == 1


def test_finished_calls_do_not_stay_in_the_starvation_heap():
    # A beta so large that no deadline ever passes: lazy invalidation alone
    # kept one entry per finished call, and one per waiting sibling at each finish.
    c = core("plas", queue_base=1.0, num_queues=4, beta=1e9)
    now = 0.0
    for i in range(5000):
        p = f"P{i % 50}"
        call = c.add_call(f"{p}/{i}", p, str(i), 10, now)
        c.on_admitted(call)
        now += 2.0
        c.on_step({call.id: 2.0}, now)
        c.finish_call(call, now)
    assert c.promote_starving(now) == []
    assert not c.calls and len(c._deadlines) <= 2 * 1 + 65  # at most the compaction threshold's worth


def test_anti_starvation_promotes_at_the_solved_deadline():
    c = core("plas", queue_base=1.0, num_queues=4, beta=2.0)
    a0 = c.add_call("A/0", "A", "0", 10, 0.0)
    c.on_admitted(a0)
    c.on_step({"A/0": 3.0}, 3.0)
    c.finish_call(a0, 3.0)  # T_p = 3, W_p = 0
    a1 = c.add_call("A/1", "A", "1", 10, 3.0)  # waits in Q3
    assert a1.queue == 2
    # (W_p + W_c) / (T_p + T_c) >= 2  <=>  W_c >= 6  <=>  t >= 9
    assert c.promote_starving(8.99) == []
    assert c.promote_starving(9.0) == [a1]
    assert a1.queue == 0 and a1.reset_time == 9.0 and a1.service_since_reset == 0.0
    assert c.table.programs["A"].total_service == 3.0  # only the call's W and T reset


@pytest.mark.parametrize("policy, params, deadline", [
    # PLAS: T_c = 1.2, W_p = T_p = 0; (t - 1.2) / 1.2 >= 2  <=>  t >= 3.6
    ("plas", dict(queue_base=1.0, num_queues=4, beta=2.0), 3.6),
    # MLFQ: promoted 10 s after it last started waiting (at 0.6)
    ("mlfq", dict(mlfq_base_quantum=1.0, mlfq_starve_after=10.0, num_queues=4), 10.6),
])
def test_a_call_demoted_while_waiting_still_starves_into_the_top_queue(policy, params, deadline):
    # Async scheduling charges step N after step N+1 was scheduled; if N+1
    # preempted the call, the charge demotes a waiting call. It waited in
    # the top queue with no deadline, so the demotion must give it one.
    c = core(policy, **params)
    a = c.add_call("A/0", "A", "0", 10, 0.0)
    assert a.queue == 0
    c.on_admitted(a)
    c.on_step({"A/0": 0.6}, 0.6)
    c.on_preempted(a, 0.6)  # step N+1 scheduled without it
    c.on_step({"A/0": 0.6}, 1.2)  # step N's output arrives: 1.2 s > the top queue's 1 s quantum
    assert a.queue == 1 and not a.running
    assert c.promote_starving(deadline - 0.01) == []
    assert c.promote_starving(deadline + 1e-9) == [a]
    assert a.queue == 0


def test_starvation_deadline_moves_earlier_when_a_sibling_finishes():
    c = core("plas", queue_base=1.0, num_queues=4, beta=2.0)
    r = c.add_call("A/r", "A", "r", 10, 0.0)
    c.on_admitted(r)
    c.on_step({"A/r": 3.0}, 3.0)
    c.finish_call(r, 3.0)
    s1 = c.add_call("A/1", "A", "1", 10, 3.0)
    s2 = c.add_call("A/2", "A", "2", 10, 3.0)
    c.on_admitted(s1)  # s1 runs 1 s after waiting 2 s; s2 keeps waiting
    c.on_step({"A/1": 1.0}, 6.0)
    c.finish_call(s1, 6.0)  # T_p = 4, W_p = 2 -> s2 starves when W_c >= 2*4 - 2 = 6
    assert c.promote_starving(8.99) == []
    assert c.promote_starving(9.0) == [s2]


def test_engines_sharing_a_table_each_promote_only_their_own_calls():
    # The simulator's replicas share one process table. A's finish must not
    # leave B's waiting call in A's deadline heap (A would promote it without
    # B re-sorting its queue); B rechecks its own calls of the program.
    def engines():
        p = PolicyParams(queue_base=1.0, num_queues=4, beta=2.0)
        table = ProcessTable(p.program_ttl)
        a, b = (SchedulerCore(make_policy("plas", p), table) for _ in range(2))
        r = a.add_call("A/r", "A", "r", 10, 0.0)
        a.on_admitted(r)
        a.on_step({"A/r": 3.0}, 3.0)
        a.finish_call(r, 3.0)  # T_p = 3, W_p = 0: a new sibling starves after 6 s
        s1 = a.add_call("A/1", "A", "1", 10, 3.0)
        s2 = b.add_call("A/2", "A", "2", 10, 3.0)  # deadline 9
        a.on_admitted(s1)  # waits 4 s, runs 1 s
        a.on_step({"A/1": 1.0}, 8.0)
        a.finish_call(s1, 8.0)  # T_p = 4, W_p = 4: s2 starves once W_c >= 4, at t = 7
        return a, b, s2

    a, b, s2 = engines()
    assert a.promote_starving(100.0) == []
    assert b.promote_starving(8.0) == []  # still the deadline pushed at arrival
    assert b.promote_starving(9.0) == [s2]
    a, b, s2 = engines()
    b.recheck_starvation(b.table.programs["A"])
    assert b.promote_starving(8.0) == [s2]


def test_mlfq_promotes_after_waiting_threshold():
    c = core("mlfq", mlfq_starve_after=4.0, mlfq_prefill_s_per_token=1.0)
    a = c.add_call("A/0", "A", "0", 100, 0.0)  # long prompt: a low queue
    assert a.queue > 0
    assert c.promote_starving(3.9) == []
    assert c.promote_starving(4.0) == [a]


def test_locality_pins_long_calls_and_spreads_short_ones():
    table = ProcessTable(60.0)
    bal = make_balancer("locality", 2048)
    p = table.get_or_create("P", 0.0)
    assert bal.choose(3000, p, [5, 1, 3]) == 1  # first long call pins to least used
    assert bal.choose(3000, p, [5, 9, 0]) == 1  # stays pinned despite load
    assert bal.choose(2048, p, [5, 9, 0]) == 2  # short call: least used
    rr = make_balancer("round_robin")
    assert [rr.choose(10, p, [0, 0, 0]) for _ in range(4)] == [0, 1, 2, 0]
    assert make_balancer("least_used").choose(10, p, [2, 1, 1]) == 1
    # A program whose short calls ran elsewhere pins its first long call
    # where its previous call ran (its history is cached there), not where load is least.
    q = table.get_or_create("Q", 0.0)
    assert bal.choose(700, q, [3, 0, 2]) == 1
    assert bal.choose(1500, q, [3, 4, 0]) == 2  # short: least used again
    assert bal.choose(2100, q, [0, 4, 5]) == 2  # first long call: the previous call's engine
    assert bal.choose(2200, q, [0, 4, 5]) == 2
    assert bal.choose(100, q, [0, 4, 5]) == 0
    assert bal.choose(2300, q, [1, 4, 5]) == 2  # pinned: later short calls do not move the pin
    with pytest.raises(ValueError,
                       match=r"^unknown balancer 'random'; valid choices: round_robin, least_used, locality$"):
        make_balancer("random")


def test_locality_threshold_zero_pins_every_call_to_its_program_engine():
    table = ProcessTable(60.0)
    sticky = make_balancer("locality", 0)
    p, q = table.get_or_create("P", 0.0), table.get_or_create("Q", 0.0)
    assert sticky.choose(10, p, [4, 2, 3]) == 1  # the first call pins, however short
    assert sticky.choose(1, p, [4, 9, 0]) == 1
    assert sticky.choose(10, q, [4, 9, 0]) == 2  # another program pins where load is least


def test_process_table_expires_idle_programs_only():
    t = ProcessTable(ttl=10.0)
    c = SchedulerCore(make_policy("plas"), t)
    a = c.add_call("A/0", "A", "0", 10, 0.0)
    c.add_call("B/0", "B", "0", 10, 0.0)
    c.finish_call(a, 1.0)
    assert t.expire(10.9) == []
    assert t.expire(11.0) == ["A"]  # B still has a live call
    assert "B" in t and "A" not in t
    with pytest.raises(ValueError, match=r"^program 'B' still has live calls: \['0'\]$"):
        t.remove("B")


def test_duplicate_live_call_is_rejected():
    c = core("fcfs")
    c.add_call("A/0", "A", "0", 10, 0.0)
    with pytest.raises(ValueError, match=r"^call 'A/0' is already live on this engine$"):
        c.add_call("A/0", "A", "0", 10, 0.0)


def test_bad_params_name_the_key():
    with pytest.raises(ValueError, match=r"^policy_params\.beta: expected > 0 and finite, got 0$"):
        PolicyParams(beta=0)


def test_a_call_is_a_policy_victim_at_most_preempt_limit_times():
    c = core("plas", queue_base=1.0, num_queues=4)  # preempt_limit defaults to 1
    old = c.add_call("A/0", "A", "0", 10, 0.0)
    c.on_admitted(old)
    c.on_step({"A/0": 5.0}, 5.0)
    new = c.add_call("B/0", "B", "0", 10, 5.0)
    assert c.choose_victims([old], [new], 0, 100, lambda _: 1, lambda _: 1) == [old]
    c.on_preempted(old, 5.0)
    c.on_admitted(old)  # readmitted; now protected from further policy preemption
    assert old.preemptions == 1
    assert c.choose_victims([old], [new], 0, 100, lambda _: 1, lambda _: 1) == []
    unlimited = core("plas", queue_base=1.0, num_queues=4, preempt_limit=None)
    o = unlimited.add_call("A/0", "A", "0", 10, 0.0)
    unlimited.on_admitted(o)
    unlimited.on_step({"A/0": 5.0}, 5.0)
    unlimited.on_preempted(o, 5.0)
    unlimited.on_admitted(o)
    n = unlimited.add_call("B/0", "B", "0", 10, 5.0)
    assert unlimited.choose_victims([o], [n], 0, 100, lambda _: 1, lambda _: 1) == [o]


def test_preempt_margin_requires_that_many_queues_of_difference():
    c = core("plas", queue_base=1.0, num_queues=4, preempt_margin=2)
    old = c.add_call("A/0", "A", "0", 10, 0.0)
    c.on_admitted(old)
    c.on_step({"A/0": 1.5}, 1.5)  # Q2: one queue below a fresh call
    new = c.add_call("B/0", "B", "0", 10, 1.5)
    assert c.choose_victims([old], [new], 0, 100, lambda _: 1, lambda _: 1) == []
    c.on_step({"A/0": 1.0}, 2.5)  # Q3: two below
    assert c.choose_victims([old], [new], 0, 100, lambda _: 1, lambda _: 1) == [old]


def test_imports_flow_one_way():
    """DESIGN.md section 3: traces <- sim.core <- sim, and sim.core <- engine; never back."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    forbidden = {"traces": ("sim", "engine"), "sim": ("engine",), "sim/core": ("traces", "engine", "sim.")}
    bad = []
    for package, banned in forbidden.items():
        for path in (root / package).rglob("*.py"):
            if package == "sim" and "core" in path.relative_to(root / "sim").parts[:1]:
                continue  # checked with its own, stricter rule
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    if package == "sim/core" and name.startswith("sim.core"):
                        continue
                    if any(name == b.rstrip(".") or name.startswith(b.rstrip(".") + ".") for b in banned):
                        bad.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    assert bad == []


def test_finishing_or_aborting_a_call_that_is_not_live_is_refused():
    """A second finish would charge the call's service to its program twice."""
    c = core("plas")
    a = c.add_call("p/0", "p", "0", 10, 0.0)
    c.on_admitted(a)
    c.on_step({"p/0": 1.0}, 1.0)
    c.finish_call(a, 1.0)
    with pytest.raises(ValueError, match="'p/0' is not live on this engine"):
        c.finish_call(a, 2.0)
    assert c.table.programs["p"].total_service == 1.0
    # A stale handle on the same thread must not drop the thread's new call.
    b = c.add_call("p/0b", "p", "0", 10, 2.0)
    with pytest.raises(ValueError, match="not live"):
        c.abort_call(a, 3.0)
    assert c.table.programs["p"].live == {"0": b}
    assert c.table.expire(1e9) == []  # the program still has a live call


class _AlwaysCompact(SchedulerCore):
    def _push_deadline(self, call, program):
        super()._push_deadline(call, program)
        self._compact_deadlines()


class _NeverCompact(SchedulerCore):
    def _compact_deadlines(self):
        pass


@settings(max_examples=150, deadline=None)
@given(data=st.data(), policy=st.sampled_from(["plas", "atlas", "mlfq"]), beta=st.sampled_from([0.5, 1.0, 2.0]))
def test_compacting_the_starvation_heap_changes_no_decision(data, policy, beta):
    """Random arrivals, admissions, preemptions, charges and finishes on two cores,
    one compacting its heap after every push and one never: the same promotions."""
    params = PolicyParams(queue_base=0.5, num_queues=4, beta=beta, mlfq_base_quantum=0.5, mlfq_starve_after=2.0)
    cores = [cls(make_policy(policy, params), ProcessTable(params.program_ttl)) for cls in (_AlwaysCompact, _NeverCompact)]
    now, n = 0.0, 0
    for _ in range(data.draw(st.integers(5, 80), label="ops")):
        now += data.draw(st.sampled_from([0.0, 0.25, 1.0, 3.0]), label="dt")
        live = sorted(cores[0].calls)
        op = data.draw(st.sampled_from(["add", "admit", "preempt", "step", "finish"] if live else ["add"]), label="op")
        target = data.draw(st.sampled_from(live), label="call") if live and op != "add" else None
        for c in cores:
            if op == "add":
                program = f"P{n % 3}"
                c.add_call(f"{program}/{n}", program, str(n), 10 + n, now)
            elif op == "admit" and not c.calls[target].running:
                c.on_admitted(c.calls[target])
            elif op == "preempt" and c.calls[target].running:
                c.on_preempted(c.calls[target], now)
            elif op == "step":
                c.on_step({cid: 0.5 for cid, call in c.calls.items() if call.running}, now)
            elif op == "finish":
                c.finish_call(c.calls[target], now)
        n += op == "add"
        promoted = [[call.id for call in c.promote_starving(now)] for c in cores]
        assert promoted[0] == promoted[1]
        orders = [[call.id for call in c.order(c.calls.values())] for c in cores]
        assert orders[0] == orders[1]


def test_compacting_keeps_the_deadline_a_sibling_s_finish_moved_earlier():
    # The heap compacted after every push: s2's entry from its arrival and the
    # one from s1's finish are for one wait; the earlier must stay.
    params = PolicyParams(queue_base=1.0, num_queues=4, beta=2.0)
    c = _AlwaysCompact(make_policy("plas", params), ProcessTable(params.program_ttl))
    r = c.add_call("A/r", "A", "r", 10, 0.0)
    c.on_admitted(r)
    c.on_step({"A/r": 3.0}, 3.0)
    c.finish_call(r, 3.0)
    s1 = c.add_call("A/1", "A", "1", 10, 3.0)
    s2 = c.add_call("A/2", "A", "2", 10, 3.0)
    # At arrival, T_p = 3 and W_p = 0: s2 starves when W_c >= 2*3 = 6, at t = 9.
    assert c.promote_starving(3.0) == []
    c.on_admitted(s1)
    c.on_step({"A/1": 1.0}, 7.0)
    c.finish_call(s1, 7.0)  # T_p = 4, W_p = 3: W_c >= 2*4 - 3 = 5, at t = 8
    assert c.promote_starving(7.99) == []
    assert c.promote_starving(8.0) == [s2]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["push", "end", "due"]), st.integers(0, 30)), max_size=300))
def test_expiries_give_each_live_key_once_at_its_time_whatever_ended_early(ops):
    """Against a plain scan: the heap behind KV pins (`sim.replica`, `engine.kv_pins`) skips pins that
    ended early and stays bounded by the live ones, however many were pushed and ended."""
    from sim.core import Expiries

    live: dict[int, float] = {}
    expiries = Expiries(live)
    next_key = 0
    for op, t in ops:
        if op == "push":
            live[next_key] = float(t)
            expiries.push(float(t), next_key)
            next_key += 1
            assert len(expiries) <= 2 * len(live) + 64  # rebuilt once stale entries pile up
        elif op == "end" and live:
            del live[sorted(live)[t % len(live)]]  # taken up or dropped: its entry goes stale
        elif op == "due":
            expected = sorted((when, key) for key, when in live.items() if when <= t)
            got = []
            for key in expiries.pop_due(float(t)):
                got.append((live.pop(key), key))
            assert got == expected
        assert expiries.next_time() <= min(live.values(), default=float("inf"))


# ------------------------------------------------ the victim search against a plain reference
class _RankByQueue:
    """A preemptive policy stub: a call's rank is its key's first field (its queue)."""

    preemptive = True

    def __init__(self, margin, limit):
        # Not PolicyParams, which refuses margin 0 (equal ranks may displace each other here).
        self.params = SimpleNamespace(preemption=True, preempt_margin=margin, preempt_limit=limit)

    def outranks(self, waiting, running):
        return running.key[0] - waiting.key[0] >= self.params.preempt_margin


def _reference_victims(running, waiting, free_seqs, free_blocks, blocks, budget, policy):
    """The search's rule on a plain list of the candidates not yet victims, worst first.

    Returns the victims and the waiting calls the search counts admitted.
    """
    limit = policy.params.preempt_limit
    pool = sorted((c for c in running if limit is None or c.preemptions < limit), key=lambda c: c.key, reverse=True)
    total = 0 if budget is None else budget.tokens
    asked = 0 if budget is None else budget.fixed + sum(budget.running(c) for c in running)
    victims, admitted = [], []
    free_seqs0, free_blocks0 = free_seqs, free_blocks
    for w in waiting:
        need = blocks[w.id]
        tokens = 0 if budget is None else budget.waiting(w)
        least = 0 if budget is None else (tokens if not budget.chunked and tokens > 1 else 1)
        seqs, free, wanted, taken = free_seqs, free_blocks, asked, []

        def fits():
            return seqs >= 1 and free >= need and total - wanted >= least

        for c in pool:
            if fits() or not policy.outranks(w, c):
                break
            gives = 0 if budget is None else budget.running(c)
            if seqs >= 1 and free >= need and total - wanted + gives < least:
                continue  # for the budget alone, and it does not cover the lack
            taken.append(c)
            seqs, free, wanted = seqs + 1, free + blocks[c.id], wanted - gives
        if not fits():
            break
        kept = list(taken)
        for c in reversed(taken[:-1]):  # needless once later ones are out: give back, best first
            gives = 0 if budget is None else budget.running(c)
            if seqs > 1 and free - blocks[c.id] >= need and total - wanted - gives >= least:
                kept.remove(c)
                seqs, free, wanted = seqs - 1, free - blocks[c.id], wanted + gives
        victims += kept
        pool = [c for c in pool if c not in kept]
        free_seqs, free_blocks, asked = seqs - 1, free - need, wanted + tokens
        admitted.append(w)
    # Then, best first, each victim without which the engine still admits every call counted in.
    for c in sorted(victims, key=lambda c: c.key):
        rest = [v for v in victims if v is not c]
        if _engine_admits(running, waiting, rest, free_seqs0, free_blocks0, blocks, budget)[:len(admitted)] == admitted:
            victims = rest
    return victims, admitted


def _engine_admits(running, waiting, victims, free_seqs, free_blocks, blocks, budget):
    """The engine's order: the running calls left take their tokens, then the waiting pass in order."""
    seqs = free_seqs + len(victims)
    free = free_blocks + sum(blocks[v.id] for v in victims)
    left = None if budget is None else budget.tokens - budget.fixed
    if budget is not None:
        for c in running:
            if c not in victims:
                left -= min(budget.running(c), max(left, 0))
    admitted = []
    for w in waiting:
        if seqs < 1 or free < blocks[w.id]:
            break
        if budget is not None:
            tokens = budget.waiting(w)
            if left < (tokens if not budget.chunked and tokens > 1 else 1):
                break
            left -= min(tokens, left)
        seqs, free = seqs - 1, free - blocks[w.id]
        admitted.append(w)
    return admitted


@st.composite
def _victim_search_cases(draw):
    from sim.core.state import CallState

    serial = iter(range(10_000))

    def call(prefix, preempted):
        n = next(serial)
        c = CallState(f"{prefix}{n}", f"P{n}", "0", 0.0, 10, n)
        c.key = (draw(st.integers(0, 4)), n)
        c.preemptions = draw(st.sampled_from([0, 1])) if preempted else 0
        return c

    running = [call("r", True) for _ in range(draw(st.integers(1, 7)))]
    waiting = sorted((call("w", False) for _ in range(draw(st.integers(1, 5)))), key=lambda c: c.key)
    blocks = {c.id: draw(st.integers(0, 4)) for c in running + waiting}
    tokens = {c.id: draw(st.sampled_from([0, 1, 1, 2, 3, 5, 8, 13])) for c in running}
    tokens.update({c.id: draw(st.sampled_from([1, 1, 2, 3, 5, 8, 13])) for c in waiting})
    budget = draw(st.one_of(st.none(), st.builds(
        lambda total, chunked, fixed: TokenBudget(total, lambda c: tokens[c.id], lambda c: tokens[c.id], chunked, fixed),
        st.integers(1, 30), st.booleans(), st.sampled_from([0, 1, 3]))))
    policy = _RankByQueue(draw(st.integers(0, 2)), draw(st.sampled_from([None, 1])))
    return policy, running, waiting, draw(st.integers(0, 2)), draw(st.integers(0, 6)), blocks, budget


@settings(max_examples=3000, deadline=None)
@given(_victim_search_cases())
def test_the_victim_search_matches_its_rule_and_every_call_it_counts_in_is_admitted(case):
    """The search keeps its candidates in a spare list and an index, not a plain pool: a
    reordering there went unseen by every hand case (a review's mutant). And the engine's own
    order (running pass, then waiting pass) must admit each waiting call the search counted in."""
    policy, running, waiting, free_seqs, free_blocks, blocks, budget = case
    got = SchedulerCore(policy, ProcessTable(60.0)).choose_victims(
        running, waiting, free_seqs, free_blocks, lambda c: blocks[c.id], lambda c: blocks[c.id], budget)
    expected, admitted = _reference_victims(running, waiting, free_seqs, free_blocks, blocks, budget, policy)
    assert [c.id for c in got] == [c.id for c in expected]
    assert len({c.id for c in got}) == len(got)
    assert all(policy.params.preempt_limit is None or c.preemptions < policy.params.preempt_limit for c in got)
    real = _engine_admits(running, waiting, got, free_seqs, free_blocks, blocks, budget)
    assert [w.id for w in real[:len(admitted)]] == [w.id for w in admitted]


def test_candidates_given_back_from_the_spares_stay_worst_first():
    """A review's mutant put calls given back after the untouched spares; only this order of
    seat, block and budget victims across three waiting calls told it apart."""
    from sim.core.state import CallState

    def call(name, queue, n, preemptions=0):
        c = CallState(name, f"P{n}", "0", 0.0, 10, n)
        c.key, c.preemptions = (queue, n), preemptions
        return c

    running = [call("r0", 2, 0), call("r2", 3, 2, 1), call("r4", 4, 4), call("r6", 4, 6), call("r8", 4, 8)]
    waiting = [call("w10", 0, 10), call("w14", 1, 14), call("w12", 2, 12)]
    blocks = {"r0": 4, "r2": 4, "r4": 3, "r6": 4, "r8": 1, "w10": 1, "w14": 1, "w12": 4}
    tokens = {"r0": 2, "r2": 13, "r4": 1, "r6": 2, "r8": 0, "w10": 2, "w14": 1, "w12": 1}
    budget = TokenBudget(7, lambda c: tokens[c.id], lambda c: tokens[c.id], chunked=True)
    policy = _RankByQueue(0, None)
    got = SchedulerCore(policy, ProcessTable(60.0)).choose_victims(
        running, waiting, 0, 3, lambda c: blocks[c.id], lambda c: blocks[c.id], budget)
    assert [c.id for c in got] == ["r2", "r6", "r8"]
    assert _reference_victims(running, waiting, 0, 3, blocks, budget, policy)[0] == got


def test_a_victim_taken_for_an_earlier_call_is_given_back_when_a_later_ones_blocks_cover_it():
    """Worked by hand. No free block, 11 tokens of budget, of which r3's decode-sized chunk asks 10.
    w0 needs 2 blocks and 1 token: it takes r4, the worst (2 blocks). w1 needs 2 blocks and all 10
    tokens (no chunked prefill): only r3 covers them, and its 5 blocks cover w0's 2 as well. So r4
    was needless: without it the engine frees 5 blocks and 11 tokens, w0 takes 2 and 1, w1 2 and 10."""
    from sim.core.state import CallState

    def call(name, queue, n):
        c = CallState(name, f"P{n}", "0", 0.0, 10, n)
        c.key = (queue, n)
        return c

    running = [call("r3", 3, 3), call("r4", 4, 4)]
    waiting = [call("w0", 0, 0), call("w1", 1, 1)]
    blocks = {"r3": 5, "r4": 2, "w0": 2, "w1": 2}
    tokens = {"r3": 10, "r4": 0, "w0": 1, "w1": 10}
    budget = TokenBudget(11, lambda c: tokens[c.id], lambda c: tokens[c.id], chunked=False)
    got = SchedulerCore(_RankByQueue(1, None), ProcessTable(60.0)).choose_victims(
        running, waiting, 8, 0, lambda c: blocks[c.id], lambda c: blocks[c.id], budget)
    assert [c.id for c in got] == ["r3"]
    assert _engine_admits(running, waiting, got, 8, 0, blocks, budget) == waiting


@settings(max_examples=3000, deadline=None)
@given(_victim_search_cases())
def test_no_victim_can_be_spared(case):
    """Against the engine's own order of admission: without any one victim, some waiting call the
    search counted in would not be admitted."""
    policy, running, waiting, free_seqs, free_blocks, blocks, budget = case
    got = SchedulerCore(policy, ProcessTable(60.0)).choose_victims(
        running, waiting, free_seqs, free_blocks, lambda c: blocks[c.id], lambda c: blocks[c.id], budget)
    admitted = _engine_admits(running, waiting, got, free_seqs, free_blocks, blocks, budget)
    for c in got:
        rest = [v for v in got if v is not c]
        assert _engine_admits(running, waiting, rest, free_seqs, free_blocks, blocks, budget) != admitted, c.id
