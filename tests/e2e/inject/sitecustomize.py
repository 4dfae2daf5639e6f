"""Fault injection for tests, run at start-up by every Python process that has this directory
on its PYTHONPATH (a worker and the TP ranks it spawns).

``PDSERVE_TEST_RECEIVER_FAIL=RANK:PATH``: the KV receiver thread of TP rank RANK raises once the
file PATH exists (the other ranks' receivers run normally), so a test can break one rank's
thread after the worker registered.

``PDSERVE_TEST_SENDER_FAIL=RANK:PATH``: the same for the KV sender thread of a prefill TP rank.
"""
import os

_spec = os.environ.get("PDSERVE_TEST_RECEIVER_FAIL")
if _spec:
    import time

    from kvtransfer import receiver as _receiver

    _rank, _path = _spec.split(":", 1)
    _original = _receiver.KVReceiver._loop

    def _loop(self):
        if self.rank != int(_rank):
            return _original(self)
        while not self._stop.is_set():
            if os.path.exists(_path):
                raise RuntimeError("injected receiver failure")
            time.sleep(0.05)

    _receiver.KVReceiver._loop = _loop

_spec = os.environ.get("PDSERVE_TEST_SENDER_FAIL")
if _spec:
    import queue as _queue

    from kvtransfer import sender as _sender

    _sender_rank, _sender_path = _spec.split(":", 1)
    _original_run = _sender.KVSender._run

    def _run(self):
        if self.rank != int(_sender_rank):
            return _original_run(self)
        while True:
            if os.path.exists(_sender_path):
                raise RuntimeError("injected sender failure")
            try:
                job = self._jobs.get(timeout=0.05)
            except _queue.Empty:
                continue
            if job[0] == "stop":
                return
            self._jobs.put(job)  # not this thread's to run: the real loop would take it
            return _original_run(self)

    _sender.KVSender._run = _run
