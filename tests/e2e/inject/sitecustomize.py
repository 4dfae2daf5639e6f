"""Fault injection for tests, run at start-up by every Python process that has this directory
on its PYTHONPATH (a worker and the TP ranks it spawns).

``PDSERVE_TEST_RECEIVER_FAIL=RANK:PATH``: the KV receiver thread of TP rank RANK raises once the
file PATH exists (the other ranks' receivers run normally), so a test can break one rank's
thread after the worker registered.

``PDSERVE_TEST_SENDER_FAIL=RANK:PATH``: the same for the KV sender thread of a prefill TP rank.
"""
import os
import queue
import time


def _inject(env: str, cls, name: str, failing) -> None:
    """When ``env`` is ``RANK:PATH``, replace ``cls.name`` on rank RANK by
    ``failing(self, path, original)``; other ranks keep the original."""
    spec = os.environ.get(env)
    if not spec:
        return
    rank, path = spec.split(":", 1)
    original = getattr(cls, name)

    def method(self):
        if self.rank != int(rank):
            return original(self)
        return failing(self, path, original)

    setattr(cls, name, method)


def _failing_receiver_loop(self, path, original):
    while not self._stop.is_set():
        if os.path.exists(path):
            raise RuntimeError("injected receiver failure")
        time.sleep(0.05)


def _failing_sender_run(self, path, original):
    while True:
        if os.path.exists(path):
            raise RuntimeError("injected sender failure")
        try:
            job = self._jobs.get(timeout=0.05)
        except queue.Empty:
            continue
        if job[0] == "stop":
            return
        self._jobs.put(job)  # not this thread's to run: the real loop would take it
        return original(self)


if os.environ.get("PDSERVE_TEST_RECEIVER_FAIL"):
    from kvtransfer.receiver import KVReceiver

    _inject("PDSERVE_TEST_RECEIVER_FAIL", KVReceiver, "_loop", _failing_receiver_loop)
if os.environ.get("PDSERVE_TEST_SENDER_FAIL"):
    from kvtransfer.sender import KVSender

    _inject("PDSERVE_TEST_SENDER_FAIL", KVSender, "_run", _failing_sender_run)
