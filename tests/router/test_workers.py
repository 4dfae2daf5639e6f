import pytest

from kvtransfer.allocator import block_hashes
from router.policy import PrefixIndex, pick_decode, pick_prefill
from router.workers import RegistrationError, WorkerRegistry

SPEC = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "block_size": 4, "dtype": "float32"}


def info(role="decode", **over):
    base = {"role": role, "tp_size": 1, "kv_spec": dict(SPEC), "fingerprint": "abc", "model": "m",
            "transports": {"transports": ["shm", "zmq"], "host": "h1", "boot_id": "b", "shm_id": "s"}, "max_model_len": 64, "num_blocks": 100, "vocab_size": 258,
            "host": "h1", "pid": 1}
    base.update(over)
    return base


def registry(*roles, **kw):
    reg = WorkerRegistry(kw.pop("fingerprint", None), kw.pop("kv_transport", "auto"))
    workers = [reg.register(f"id{i}".encode(), f"{role}-{i}", info(role), 0.0) for i, role in enumerate(roles)]
    return reg, workers


def test_first_worker_sets_the_reference_and_mismatches_are_refused_with_reasons():
    reg, _ = registry("decode")
    with pytest.raises(RegistrationError, match="model mismatch.*fingerprint other.*same --model"):
        reg.register(b"x", "p", info("prefill", fingerprint="other"), 0.0)
    with pytest.raises(RegistrationError, match="KV spec block_size differs: 4 here, 8 there"):
        reg.register(b"x", "p", info("prefill", kv_spec={**SPEC, "block_size": 8}), 0.0)
    with pytest.raises(RegistrationError, match="KV spec dtype differs"):
        reg.register(b"x", "p", info("prefill", kv_spec={**SPEC, "dtype": "bfloat16"}), 0.0)
    assert list(reg.by_id) == ["decode-0"]


def test_router_model_fingerprint_is_enforced_from_the_start():
    reg = WorkerRegistry("zzz")
    with pytest.raises(RegistrationError, match="model mismatch"):
        reg.register(b"x", "d", info(), 0.0)


@pytest.mark.parametrize("bad, match", [
    ({"role": "cook"}, "role must be one of"),
    ({"tp_size": 0}, "tp_size must be positive"),
    ({"num_blocks": True}, r"info\['num_blocks'\] has the wrong type bool"),
    ({"kv_spec": {"num_layers": 2}}, "bad KV spec"),
    ({"max_model_len": 1}, "max_model_len must be at least 2"),
    ({"host": 5}, "wrong type int"),
])
def test_malformed_register_info_is_refused(bad, match):
    reg = WorkerRegistry(None)
    with pytest.raises(RegistrationError, match=match):
        reg.register(b"x", "w", info(**bad), 0.0)
    incomplete = info()
    del incomplete["fingerprint"]
    with pytest.raises(RegistrationError, match="lacks 'fingerprint'"):
        reg.register(b"x", "w", incomplete, 0.0)


def test_duplicate_live_id_refused_restart_after_death_accepted_repeat_is_idempotent():
    reg, (d,) = registry("decode")
    assert reg.register(b"id0", "decode-0", info(), 1.0) is d          # repeated Register
    with pytest.raises(RegistrationError, match="already registered by a live worker"):
        reg.register(b"other", "decode-0", info(), 1.0)
    assert reg.mark_dead(d) and not reg.mark_dead(d)
    again = reg.register(b"other", "decode-0", info(), 2.0)
    assert again is not d and reg.by_id["decode-0"] is again and reg.alive() == [again]


def test_liveness_expiry_and_forced_transport():
    reg, (p, d) = registry("prefill", "decode")
    p.last_seen = 10.0
    assert reg.verdicts(12.0, 5.0, 3.0) == [(d, "silent", "sent nothing for 12.0s")]
    assert reg.transport_for(p, d) == "shm"
    assert reg.transport_for(d, d) == "local"
    other_host = {"transports": ["shm", "zmq"], "host": "h2", "boot_id": "c", "shm_id": "s"}
    reg.register(b"x", "d2", info(transports=other_host), 0.0)
    assert reg.transport_for(p, reg.by_id["d2"]) == "zmq"  # shm needs one host
    forced = WorkerRegistry(None, "nixl")
    with pytest.raises(RegistrationError, match="--kv-transport nixl"):
        forced.register(b"x", "d", info(), 0.0)
    forced_shm = WorkerRegistry(None, "shm")
    fp = forced_shm.register(b"p", "p", info("prefill"), 0.0)
    fd = forced_shm.register(b"d", "d", info(transports=other_host), 0.0)
    assert forced_shm.transport_for(fp, fd) is None  # forced shm across hosts: no pair


def test_decode_pick_fewest_sequences_then_most_free_blocks_and_must_fit():
    reg, (a, b) = registry("decode", "decode")
    a.reserved_blocks, b.reserved_blocks = 10, 20
    assert pick_decode([a, b], 5) is a
    a.num_decoding = 1
    assert pick_decode([a, b], 5) is b
    assert pick_decode([a, b], 85) is a             # only a has 90 free
    a.is_full = True
    assert pick_decode([a, b], 85) is None
    b.alive = False
    assert pick_decode([a, b], 1) is None


def test_prefix_index_is_bounded_lru_and_matches_leading_blocks():
    index = PrefixIndex(3)
    index.add([1, 2, 3])
    assert index.num_matched([1, 2, 9]) == 2 and index.num_matched([9, 1]) == 0
    index.add([1, 4])                               # 1 refreshed; 2 evicted (oldest)
    assert len(index) == 3 and index.num_matched([1, 2]) == 1 and index.num_matched([3]) == 1


def test_prefill_pick_least_work_counting_cached_prefixes():
    reg, (p0, p1) = registry("prefill", "prefill")
    prompt = list(range(40))
    hashes = block_hashes(prompt, 4)
    assert pick_prefill([p0, p1], 40, hashes, 4) is p0          # tie: by id
    p1.prefix.add(hashes[:8])                                   # 32 of 40 tokens cached on p1
    p1.outstanding_tokens = 20
    assert pick_prefill([p0, p1], 40, hashes, 4) is p1          # 20 + 40 - 32 < 0 + 40
    p1.outstanding_tokens = 40
    assert pick_prefill([p0, p1], 40, hashes, 4) is p0          # 48 > 40: too busy
    assert pick_prefill([p0, p1], 40, block_hashes(list(range(1, 41)), 4), 4) is p0
