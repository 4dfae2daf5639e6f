"""The prefill engine's request bookkeeping: cancels, transfer outcomes and steps in any order.

These tests drive the engine on the event-loop side only (``build_plan``, ``apply``, ``abort``,
``settle``) with the outputs a model step would return, so each interleaving is hit exactly.
"""
from concurrent.futures import Future

import pytest

from models.batch import SampleResult
from models.request_options import RequestOptions
from prefill.engine import PrefillEngine
from tests.conftest import NUM_BLOCKS


@pytest.fixture()
def engine(prefill_parts):
    runner, transfers = prefill_parts
    return PrefillEngine(runner, transfers, max_num_batched_tokens=8, max_num_seqs=4)


def dest(transfer_id: str) -> dict:
    """A well-formed destination nobody listens at (the tests never wait on it)."""
    return {"transport": "zmq", "transfer_id": transfer_id, "ttl_s": 30.0,
            "ranks": [{"endpoint": "ipc:///nonexistent/pdserve-test", "num_blocks": 64,
                       "block_ids": list(range(8)), "host": "h"}]}


def add(engine, rid: str, num_tokens: int) -> None:
    engine.add(rid, f"t-{rid}", list(range(1, num_tokens + 1)), RequestOptions(temperature=0.0),
               dest(f"t-{rid}"), 0)


def step_output(plan, failed=()):
    """What rank 0's ``run_prefill_plan`` returns when the step ran: a result per chunk and a
    future per transfer begun (the test resolves them: transfer done or failed)."""
    return {"results": [SampleResult(7, -0.5) for _ in plan.chunks], "failed": list(failed),
            "started": {s.transfer_id: Future() for s in plan.sends if s.begin}}


def test_cancel_while_the_last_chunk_is_in_flight_does_not_crash(engine):
    add(engine, "a", 6)
    plan = engine.build_plan()
    assert [s.last for s in plan.sends] == [True]
    engine.abort("a")                          # the client cancels; the chunk is on the model thread
    assert engine.apply(step_output(plan)) == []
    assert engine.build_plan().aborts == ("t-a",)     # every rank aborts its transfer
    assert engine.allocator.num_free_blocks < NUM_BLOCKS  # the transfer may still read the blocks
    assert engine.settle("t-a", "aborted") == []      # cancelled: no answer
    assert engine.allocator.num_free_blocks == NUM_BLOCKS and engine.num_requests == 0


def test_first_token_is_answered_once_the_transfer_settled(engine):
    add(engine, "a", 6)
    plan = engine.build_plan()
    assert engine.apply(step_output(plan)) == []      # KV still on its way
    (answer,) = engine.settle("t-a", None)
    assert (answer.request.rid, answer.result.token_id, answer.error) == ("a", 7, None)
    assert engine.settle("t-a", None) == [] and engine.abort("a") == []   # idempotent
    assert engine.allocator.num_free_blocks == NUM_BLOCKS


def test_transfer_settling_before_its_step_is_applied(engine):
    add(engine, "a", 6)
    plan = engine.build_plan()
    assert engine.settle("t-a", None) == []           # the sender thread won the race
    (answer,) = engine.apply(step_output(plan))
    assert answer.error is None and answer.result.token_id == 7


def test_a_failed_transfer_stops_a_chunked_prompt_and_answers_once(engine):
    add(engine, "a", 20)                       # three chunks under a budget of 8
    plan = engine.build_plan()
    engine.apply(step_output(plan))
    (answer,) = engine.settle("t-a", "decode worker went away")
    assert answer.error == "decode worker went away"
    plan = engine.build_plan()
    assert plan.chunks == () and plan.aborts == ("t-a",)
    assert engine.abort("a") == [] and engine.build_plan() is None
    assert engine.allocator.num_free_blocks == NUM_BLOCKS


def test_a_transfer_that_cannot_begin_is_answered_with_the_reason(engine):
    add(engine, "a", 6)
    plan = engine.build_plan()
    (answer,) = engine.apply(step_output(plan, failed=[["t-a", "bad destination"]]))
    assert answer.error == "bad destination"
    assert engine.allocator.num_free_blocks == NUM_BLOCKS


def test_a_cancel_alone_never_builds_an_empty_model_step(engine):
    add(engine, "a", 12)                       # two chunks under a budget of 8
    plan = engine.build_plan()
    engine.apply(engine.execute_plan(plan))    # first chunk ran; its transfer is open
    engine.abort("a")
    plan = engine.build_plan()                 # only the abort is pending
    assert plan is not None and plan.chunks == () and plan.aborts == ("t-a",)
    output = engine.execute_plan(plan)         # must not run the model on no chunks
    assert output["results"] == []
    assert engine.apply(output) == []
