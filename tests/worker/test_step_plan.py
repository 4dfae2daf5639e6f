import msgpack
import pytest

from models.batch import SequenceChunk
from models.sampler import SamplingParams
from worker.step_plan import STOP_PLAN, KVSend, PlanChunk, PlanError, StepPlan

SAMPLING = {"temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 7, "num_top_logprobs": 2}
CHUNK = PlanChunk([5, 6, 7], 16, [0, 1, 2], SAMPLING, 0)
MIDDLE = PlanChunk([1, 2], 0, [3], None, 0)
BEGIN = KVSend("t1", True, False, 0, 8, {"transport": "zmq"}, [0, 1], 20)
NEXT = KVSend("t1", False, True, 8, 20)


def wire_trip(obj):
    return msgpack.unpackb(msgpack.packb(obj, use_bin_type=True), raw=False)


def test_round_trips_are_exact_through_msgpack():
    plan = StepPlan((CHUNK, MIDDLE), (BEGIN, NEXT), ("t0", "t9"))
    assert StepPlan.from_wire(wire_trip(plan.to_wire())) == plan
    assert StepPlan.from_wire(wire_trip(StepPlan((CHUNK,)).to_wire())) == StepPlan((CHUNK,))
    assert StepPlan.from_wire(wire_trip(STOP_PLAN.to_wire())).stop
    for chunk in (CHUNK, MIDDLE):
        assert PlanChunk.from_wire(wire_trip(chunk.to_wire())) == chunk
    for send in (BEGIN, NEXT):
        assert KVSend.from_wire(wire_trip(send.to_wire())) == send


def test_chunk_converts_to_and_from_the_runner_chunk():
    seq = SequenceChunk([5, 6, 7], 16, [0, 1, 2], SamplingParams(**SAMPLING), 0)
    assert PlanChunk.of(seq) == CHUNK
    assert CHUNK.to_sequence_chunk() == seq
    assert MIDDLE.to_sequence_chunk().sampling is None


@pytest.mark.parametrize("wire, match", [
    ([[1], 0, [0], None], "a plan chunk must be a list of 5 fields"),
    ([[], 0, [0], None, 0], "token_ids must not be empty"),
    ([[1, "2"], 0, [0], None, 0], "chunk token_ids must be a list of integers"),
    ([[1], -1, [0], None, 0], "chunk num_cached must be an integer >= 0"),
    ([[1], 0, [0.0], None, 0], "chunk block_table must be a list of integers"),
    ([[1], 0, [0], {"temperature": 1.0}, 0], "chunk sampling must be null or a mapping"),
    ([[1], 0, [0], [], 0], "chunk sampling must be null or a mapping"),
    ([[1], 0, [0], None, True], "chunk output_index must be an integer"),
])
def test_plan_chunk_rejects_each_malformed_field(wire, match):
    with pytest.raises(PlanError, match=match):
        PlanChunk.from_wire(wire)


def test_bad_sampling_values_are_refused_when_the_chunk_is_built():
    with pytest.raises(ValueError, match="top_p"):
        PlanChunk([1], 0, [0], {**SAMPLING, "top_p": 2.0}, 0).to_sequence_chunk()


@pytest.mark.parametrize("wire, match", [
    (["t", True, False, 0, 8, {}, [0]], "a KV send must be a list of 8 fields"),
    (["", True, False, 0, 8, {}, [0], 8], "transfer_id must be a non-empty string"),
    (["t", 1, False, 0, 8, {}, [0], 8], "begin and last must be booleans"),
    (["t", True, None, 0, 8, {}, [0], 8], "begin and last must be booleans"),
    (["t", True, False, -1, 8, {}, [0], 8], "send start must be an integer >= 0"),
    (["t", True, False, 8, 8, {}, [0], 8], "send stop must be an integer >= 9"),
    (["t", True, False, 0, 8, None, [0], 8], "a beginning send needs dest"),
    (["t", True, False, 0, 8, {}, [-1], 8], "send src must be a list of integers"),
    (["t", True, False, 0, 8, {}, [0], 0], "send num_tokens must be an integer >= 1"),
    (["t", False, False, 0, 8, {}, None, None], "only a beginning send carries"),
])
def test_kv_send_rejects_each_malformed_field(wire, match):
    with pytest.raises(PlanError, match=match):
        KVSend.from_wire(wire)


@pytest.mark.parametrize("wire, match", [
    ({"op": "step"}, "a step plan must be a list of 4 fields"),
    ([{}, [], [], False], "plan chunks must be a list"),
    ([[CHUNK.to_wire()], {}, [], False], "plan sends must be a list"),
    ([[CHUNK.to_wire()], [BEGIN.to_wire(), NEXT.to_wire()], [], False], "one per chunk"),
    ([[], [], "t1", False], "plan aborts must be a list"),
    ([[], [], [""], False], "plan aborts must be non-empty transfer id strings"),
    ([[], [], [], 0], "plan stop must be a boolean"),
])
def test_step_plan_rejects_each_malformed_field(wire, match):
    with pytest.raises(PlanError, match=match):
        StepPlan.from_wire(wire)
