import os
import subprocess
import sys

from kvtransfer.pool import KVPool, sweep_orphaned_pools
from kvtransfer.spec import KVSpec

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype="float32")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_shared_pool_is_visible_to_an_attached_process_and_removed_on_close():
    pool = KVPool(SPEC, 3, backend="shm")
    other = KVPool.attach(SPEC, 3, pool.shm_path)
    other.kv[1, 0, 2] = 7.0
    assert float(pool.kv[1, 0, 2].sum()) == 7.0 * 4 * 2 * 4
    path = pool.shm_path
    pool.close()
    assert not os.path.exists(path)


def test_sweep_removes_only_pools_of_dead_processes(tmp_path):
    dead = tmp_path / f"pdserve-kv-{_dead_pid()}-abc123"
    dead_tags = tmp_path / f"{dead.name}.owners"
    live = tmp_path / f"pdserve-kv-{os.getpid()}-def456"
    unrelated = tmp_path / "other-file"
    for path in (dead, dead_tags, live, unrelated):
        path.write_bytes(b"x")
    assert sweep_orphaned_pools(str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, unrelated.name])
