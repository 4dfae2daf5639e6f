"""The router's request state machine: queue, dispatch, token streaming, finish, failover.

Single-threaded (the router's event loop). Messages leave through an ``Outbox`` (the router's
sockets). Invariants:
- a request is in ``waiting`` iff its state is QUEUED; ``requests`` holds every live request,
  ``attempts`` every one placed on workers (by its current ``transfer_id``, the workers' rid);
- a worker's load counters sum its live requests' (router/placement.py, released exactly once);
- every worker that may hold state for a request (``decode_holds`` / ``prefill_holds``) gets a
  ``Free`` when the request ends or moves on, unless the worker itself reported the end;
- tokens reach the client in output order exactly once: decode tokens count only after the
  current attempt's ``Started`` and are held until its first token arrives;
- a Generate being tokenized off the loop is only in ``tokenizer``; it counts toward the queue bound.

Dispatch: queued requests start in order, but one that does not fit now is passed over for
later ones that do, unless it has waited ``max_head_wait_s`` (then the queue holds for it, so a
large request cannot starve). A decode worker that refuses a reservation is retried after a
short backoff (tens of milliseconds, doubling to a second) or as soon as a request on it ends,
whichever is first; never only at its next heartbeat.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from router import protocol as P
from router.admission import Admission, Rejected
from router.config import RouterConfig
from router.model_info import ModelInfo
from router.payloads import TokenItem
from router.placement import anything_fits, place, release, release_prefill, reserve
from router.ports import Observer, Outbox
from router.request import Request, State
from router.tokenizing import PromptTokenizer, TokenizeJob
from router.validation import InvalidRequest
from router.workers import WorkerRecord, WorkerRegistry

log = logging.getLogger("pdserve.router")
MAX_SCAN_MISSES = 32        # queued requests that do not fit, tried per schedule() pass
REFUSAL_BACKOFF_S = (0.02, 1.0)  # first and longest wait before retrying a refusing decode worker


class RequestScheduler:
    def __init__(self, config: RouterConfig, registry: WorkerRegistry, outbox: Outbox,
                 model: ModelInfo | None = None):
        self.config = config
        self.registry = registry
        self.outbox = outbox
        self.model = model
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.attempts: dict[str, Request] = {}  # by transfer_id, the rid workers know the attempt by
        self.by_client: dict[bytes, dict[str, Request]] = {}
        self.admission = Admission(config, registry)
        self.counters = {"finished": 0, "aborted": 0, "failed": 0, "rejected": 0, "failovers": 0}
        self.tokenizer = PromptTokenizer(config.max_tokenizing, self._tokenized)
        self.observer: Observer | None = None  # router.metrics, when metrics are served

    def close(self) -> None:
        """Stop the tokenizer thread; answer what it still holds with ``unavailable``."""
        for job in self.tokenizer.close():
            self.outbox.error(job.client, job.msg.rid, P.ERR_UNAVAILABLE, "the router is shutting down")

    # -- clients ---------------------------------------------------------------------------
    def submit(self, client: bytes, msg: P.Generate, *, offload: bool = False) -> None:
        """Admit and queue a Generate; every refusal is answered with an Error. With
        ``offload``, a long text prompt is tokenized on the tokenizer thread first
        (router/tokenizing.py) and the request exists only once that is done; without it, the
        request exists (or was refused) when this returns."""
        mine = self.by_client.get(client, {})
        num_waiting = len(self.waiting) + len(self.tokenizer)
        try:
            if (client, msg.rid) in self.tokenizer:
                raise Rejected(msg.rid, P.ERR_INVALID, f"request id {msg.rid!r} is already in use on this connection")
            if offload and self.admission.is_heavy(msg):
                if self.tokenizer.is_full:
                    raise Rejected(msg.rid, P.ERR_OVERLOADED, f"{len(self.tokenizer)} long prompts are "
                                                              "already being tokenized (the limit); retry later")
                self.admission.precheck(msg, self.model, num_waiting, mine)
                self.tokenizer.start(client, msg, self.admission.encoder(msg, self.model))
                return
            req = self.admission.admit(client, msg, self.model, num_waiting, mine)
        except Rejected as exc:
            self._reject(client, exc)
            return
        self._enqueue(req)

    def _reject(self, client: bytes, exc: Rejected) -> None:
        self.counters["rejected"] += 1
        if self.observer is not None:
            self.observer.on_rejected(exc.code)
        self.outbox.error(client, exc.client_rid, exc.code, exc.message)

    def _tokenized(self, job: TokenizeJob, encoded: list[int] | Exception) -> None:
        if isinstance(encoded, Exception):
            why = encoded if isinstance(encoded, InvalidRequest) else f"the prompt could not be tokenized: {encoded}"
            self._reject(job.client, Rejected(job.msg.rid, P.ERR_INVALID, str(why)))
            return
        try:
            req = self.admission.admit(job.client, job.msg, self.model, len(self.waiting) + len(self.tokenizer),
                                       self.by_client.get(job.client, {}), encoded)
        except Rejected as exc:
            self._reject(job.client, exc)
            return
        self._enqueue(req)
        if job.cancelled:
            self._finish(req, P.FINISH_ABORT, [], "")

    def _enqueue(self, req: Request) -> None:
        if req.spec.timeout_s is not None:
            req.deadline = asyncio.get_running_loop().call_later(req.spec.timeout_s, self._expire, req)
        self.requests[req.rid] = req
        self.by_client.setdefault(req.client, {})[req.client_rid] = req
        self.waiting.append(req)
        self.schedule()

    def cancel(self, client: bytes, client_rid: str) -> None:
        req = self.by_client.get(client, {}).get(client_rid)
        if req is not None:
            self._finish(req, P.FINISH_ABORT, [], "")
        else:
            self.tokenizer.cancel(client, client_rid)

    def client_gone(self, client: bytes) -> None:
        """The client's connection dropped: abort its requests without answering."""
        for req in list(self.by_client.get(client, {}).values()):
            self._finish(req, P.FINISH_ABORT, [], "", notify=False)
        self.tokenizer.client_gone(client)

    # -- dispatch --------------------------------------------------------------------------
    def schedule(self) -> None:
        """Start queued requests (see the module docstring for the order)."""
        if not self.waiting:
            return
        now = time.monotonic()
        i = misses = 0
        while i < len(self.waiting) and misses < MAX_SCAN_MISSES:
            req = self.waiting[i]
            try:
                fits = self._dispatch(req)
            except Exception:
                self._fail_unplaceable(req)
                return  # failing it scheduled the rest of the queue
            if fits is None:
                return  # nothing can be placed now, whatever its size
            if fits:
                del self.waiting[i]
                continue
            if now - req.queued_at > self.config.max_head_wait_s:
                return  # it waited long enough: nothing overtakes it any more
            misses += 1
            i += 1

    def _fail_unplaceable(self, req: Request) -> None:
        """A defect while placing ``req`` (say, a value its Allocate cannot carry) fails it
        alone: left at the head of the queue it would fail every later try to schedule."""
        log.exception("could not place request %s; it fails, the queue goes on", req.rid)
        self._undo_attempt(req)  # nothing reached a worker; it is still in self.waiting
        self.fail(req, P.ERR_INTERNAL, "the router could not place this request (a server "
                                       "defect, logged); other requests are not affected")

    def _dispatch(self, req: Request) -> bool | None:
        """Place ``req`` on workers: True if placed, False if it does not fit now, None if no
        request could be placed now (no live decode worker with room, or no prefill worker)."""
        if not anything_fits(self.registry):
            return None
        placement = place(self.registry, req)
        if placement is None:
            return False
        req.attempt += 1
        if req.attempt == 1 and self.observer is not None:
            self.observer.on_scheduled(req)
        req.transfer_id = f"{req.rid}.{req.attempt}"
        req.state = State.ALLOCATING
        req.handoff_since = time.monotonic()
        reserve(req, placement)
        req.decode_holds = True
        self.attempts[req.transfer_id] = req
        writer = "" if placement.prefill is placement.decode else placement.prefill.worker_id
        self.outbox.to_worker(placement.decode, P.Allocate(
            req.transfer_id, req.transfer_id, req.context_ids, req.spec.sampling, len(req.output_ids),
            placement.transport, writer))
        return True

    # -- worker events ---------------------------------------------------------------------
    def _current(self, rid, transfer_id, worker: WorkerRecord, role: str) -> Request | None:
        req = self.attempts.get(rid)
        if req is None or req.transfer_id != transfer_id or getattr(req, role) is not worker:
            return None
        return req

    def on_allocated(self, worker: WorkerRecord, msg: P.Allocated) -> None:
        req = self._current(msg.rid, msg.transfer_id, worker, "decode")
        if req is None or req.state is not State.ALLOCATING:
            return
        if msg.error is not None or msg.dest is None:
            # The worker cannot hold it now: wait for room, never fail for lack of memory.
            log.debug("decode %s refused %s: %s", worker.worker_id, req.rid, msg.error)
            req.decode_holds = False
            self._requeue(req)
            worker.is_full = True  # after _requeue, which clears it
            self._retry_later(worker)
            self.schedule()  # other workers may hold it, or later requests
            return
        worker.num_refusals = 0
        req.state = State.PREFILLING
        req.handoff_since = req.prefill_sent_at = time.monotonic()
        req.prefill_holds = True
        if req.prefill is not worker:
            req.prefill.prefix.add(req.prompt_hashes)
        context = req.context_ids
        self.outbox.to_worker(req.prefill, P.Prefill(req.transfer_id, req.transfer_id, context, req.spec.sampling,
                                                     msg.dest, len(req.output_ids)))

    def on_started(self, worker: WorkerRecord, msg: P.Started) -> None:
        req = self._current(msg.rid, msg.transfer_id, worker, "decode")
        if req is not None:
            req.started = True
            req.handoff_since = None
            if self.observer is not None:
                self.observer.on_kv_landed(req)

    def on_first_token(self, worker: WorkerRecord, msg: P.FirstToken) -> None:
        req = self._current(msg.rid, msg.transfer_id, worker, "prefill")
        if req is None or req.state is not State.PREFILLING:
            return
        release_prefill(req)
        worker.num_prefilled += 1
        worker.last_progress = time.monotonic()
        req.prefill_holds = False
        req.got_first = True
        req.state = State.DECODING
        if req.prefill is req.decode:
            req.started = True  # colocated: this worker's later Tokens are this attempt's
        req.handoff_since = None if req.started else time.monotonic()  # the KV must land next
        reason = msg.finish_reason if msg.finish_reason in P.FINISH_REASONS else None
        if reason is not None and req.prefill is req.decode:
            req.decode_holds = False  # the colocated worker ended it itself
        req.num_cached_tokens = msg.num_cached_tokens
        if not self._emit(req, msg.token_id, reason, msg.logprob, msg.top_logprobs):
            return
        early, req.early = req.early, []
        for token_id, reason, logprob, top in early:
            if not self._emit(req, token_id, reason, logprob, top):
                return

    def on_tokens(self, worker: WorkerRecord, msg: P.Tokens) -> None:
        attempts = self.attempts
        for wire_item in msg.items:
            try:
                rid, token_id, logprob, reason, top = TokenItem.from_wire(wire_item)
            except P.ProtocolError as exc:
                log.warning("worker %s sent a malformed Tokens item: %s", worker.worker_id, exc)
                continue
            req = attempts.get(rid)
            if req is None or req.decode is not worker or not req.started:
                continue  # finished, moved elsewhere, or a late token of an earlier attempt
            if reason is not None:
                req.decode_holds = False
            if req.got_first:
                self._emit(req, token_id, reason, logprob, top)
            else:
                req.early.append((token_id, reason, logprob, top))

    def on_worker_error(self, worker: WorkerRecord, msg: P.WorkerError) -> None:
        req = self.attempts.get(msg.rid)
        if req is None or worker not in (req.decode, req.prefill):
            return
        if msg.transfer_id and msg.transfer_id != req.transfer_id:
            return
        log.warning("worker %s failed request %s: %s", worker.worker_id, req.rid, msg.message)
        self.retry(req, f"worker {worker.worker_id} failed it: {msg.message}")

    def on_worker_dead(self, worker: WorkerRecord) -> None:
        """Every request that needed the dead worker starts over elsewhere (failover)."""
        if worker.role == "prefill":
            for decode in self.registry.alive():
                if decode.role == "decode":
                    self.outbox.to_worker(decode, P.PeerDead(worker.worker_id))
        for req in list(self.requests.values()):
            # A prefill worker that dies right after sending FirstToken may never have told the
            # decode worker its KV was complete: until Started arrives, the attempt depends on it.
            needs_writer = req.prefill is worker and (req.prefill_holds or not req.started)
            if req.decode is worker or needs_writer:
                if req.decode is worker:
                    req.decode_holds = False
                if req.prefill is worker:
                    req.prefill_holds = False
                self.counters["failovers"] += 1
                self.retry(req, f"worker {worker.worker_id} died")

    def _retry_later(self, worker: WorkerRecord) -> None:
        """Offer ``worker`` requests again after a backoff (its quarantined blocks may free up
        at any moment; the router learns of that only by asking)."""
        if worker.retry_timer is not None:
            return
        first, longest = REFUSAL_BACKOFF_S
        delay = min(longest, first * 2 ** min(worker.num_refusals, 10))
        worker.num_refusals += 1

        def retry() -> None:
            worker.retry_timer = None
            if worker.alive and worker.is_full:
                worker.is_full = False
                self.schedule()
        worker.retry_timer = asyncio.get_running_loop().call_later(delay, retry)

    def on_capacity(self, worker: WorkerRecord | None = None) -> None:
        """A worker registered, or reported load: it may take queued requests again."""
        if worker is not None:
            worker.is_full = False
        self.schedule()

    # -- emitting and finishing ---------------------------------------------------------------
    def _emit(self, req: Request, token_id: int, reason: str | None, logprob=None, top=None) -> bool:
        """Stream one output token. Returns False once the request is finished."""
        if req.logprobs is not None:
            req.logprobs.append((logprob, top))
        if self.observer is not None:
            self.observer.on_token(req)
        text, reason = req.accept_token(token_id, reason)
        if reason is not None:
            self._finish(req, reason, [token_id], text)
            return False
        if req.spec.stream:
            if not self.outbox.chunk(req, [token_id], text, None):
                self._finish(req, P.FINISH_ABORT, [], "", notify=False)  # the client is gone
                return False
        elif text:
            req.text.append(text)
        return True

    def _finish(self, req: Request, reason: str, token_ids: list[int], text: str, *,
                notify: bool = True, error: tuple[str, str] | None = None) -> None:
        """End a request: Free on its workers, release accounting, answer the client."""
        self._free_on_workers(req)
        release(req)
        if req.state is State.QUEUED:
            self.waiting.remove(req)
        req.state = State.DONE
        if req.deadline is not None:
            req.deadline.cancel()
        del self.requests[req.rid]
        self.attempts.pop(req.transfer_id, None)
        mine = self.by_client.get(req.client)
        if mine is not None:
            mine.pop(req.client_rid, None)
            if not mine:
                del self.by_client[req.client]
        counter = "failed" if error else ("aborted" if reason == P.FINISH_ABORT else "finished")
        self.counters[counter] += 1
        if self.observer is not None:
            self.observer.on_finished(req, reason, error[0] if error else None)
        if counter == "finished" and req.decode is not None:
            req.decode.num_decoded += 1
        if notify:
            if error is not None:
                self.outbox.error(req.client, req.client_rid, *error)
            elif req.spec.stream:
                self.outbox.chunk(req, token_ids, text, reason)
            else:
                self.outbox.chunk(req, list(req.output_ids), "".join(req.text) + text, reason)
        self.schedule()

    def fail(self, req: Request, code: str, message: str) -> None:
        self._finish(req, P.FINISH_ABORT, [], "", error=(code, message))

    def _expire(self, req: Request) -> None:
        req.deadline = None
        if req.state is not State.DONE:
            self.fail(req, P.ERR_TIMEOUT, f"the request did not finish within its timeout_s of "
                                          f"{req.spec.timeout_s:g}s")

    def retry(self, req: Request, why: str) -> None:
        """Start the request over on other workers, keeping its output so far (failover)."""
        if req.attempt >= self.config.max_attempts:
            self.fail(req, P.ERR_INTERNAL, f"gave up after {req.attempt} attempts; last: {why}")
            return
        self._free_on_workers(req)
        self._requeue(req)
        self.schedule()

    def _requeue(self, req: Request) -> None:
        """Back to the front of the queue, keeping the output produced so far."""
        self._undo_attempt(req)
        req.queued_at = time.monotonic()
        self.waiting.appendleft(req)

    def _undo_attempt(self, req: Request) -> None:
        """Queued again as far as the accounting goes: no workers, nothing charged to any."""
        release(req)
        self.attempts.pop(req.transfer_id, None)
        req.state = State.QUEUED
        req.decode = req.prefill = None
        req.started = req.got_first = False
        req.handoff_since = None
        req.early.clear()

    def _free_on_workers(self, req: Request) -> None:
        if req.decode_holds and req.decode is not None and req.decode.alive:
            unwritten = req.state is State.ALLOCATING and req.prefill is not req.decode
            self.outbox.to_worker(req.decode, P.Free(req.transfer_id,
                                                     P.FREE_UNWRITTEN if unwritten else P.FINISH_ABORT))
        if (req.prefill_holds and req.prefill is not None and req.prefill.alive
                and not (req.decode_holds and req.prefill is req.decode)):
            self.outbox.to_worker(req.prefill, P.Free(req.transfer_id))
        req.decode_holds = req.prefill_holds = False

    def stats(self) -> dict:
        states = dict.fromkeys((s.value for s in State if s is not State.DONE), 0)
        for req in self.requests.values():
            states[req.state.value] += 1
        return {"queued": len(self.waiting), "active": len(self.requests) - len(self.waiting),
                "tokenizing": len(self.tokenizer), "states": states, **self.counters}
