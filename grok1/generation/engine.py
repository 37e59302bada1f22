"""A long-lived generation engine: requests join and leave the runner's slots at any step.

The Engine keeps one `Runner` (grok1/generation/runner.py: the jitted steps over one KV cache)
busy for the life of a server, and of a model's `generate` / `stream` calls: one thread owns the
runner and the device, requests are submitted from any thread (or an event loop, through a
callback), join a free slot before the next decode call, receive their Deltas as soon as the
host reads them, and leave when they finish or are cancelled; their slot is prefilled with the
next waiting request on the following step. Scoring requests (`submit_scores`, no slot) only
prefill (grok1/generation/scoring.py).

Scheduling per step: finished and cancelled requests leave; waiting requests take free slots
(all that fit when nothing decodes, else one per step); newcomers are prefilled, a prompt longer
than `prefill_chunk` tokens in chunks of that size across steps (`steps.prefill_chunk`), and
while other requests decode only one chunk (or one short prompt) is prefilled per step, so a
newcomer holds the running requests up by one chunk's prefill at a time, however long its
prompt; then one batch of waiting scoring requests (about one chunk's tokens while others decode);
one decode call (`decode_chunk` tokens) advances every slot whose prompt is all in; then the
results of the previous call are read while the device runs this one.
Sampling is the Runner's: a request's tokens depend on its prompt, settings and seed only, not on
its slot or its neighbours (nor on whether its prompt went in chunks: the same tokens, logits
equal up to rounding).

Back-pressure: at most `max_waiting` requests wait for a slot; `submit` raises QueueFull past it.

Several processes (`grok1.distributed`): every process must make the same jitted calls in the
same order. `generate` gets that by submitting the same requests on every process. A server
takes requests on process 0 only, so its engine is built with `lead_followers=True`: before each
step process 0 publishes the step's schedule (the newcomers' slots, prompt ids and sampling
settings with their seeds, whether a decode call runs, or that the engine stopped) through a
`Broadcast` (grok1/runtime/processes.py), and the other processes run `Engine.follow`, which
makes the same calls on their part of the global state. The schedule is all they need: which slots hold or have
freed a request only matters on the host, and the step's results reach every process.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import itertools
import queue
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from grok1.runtime.processes import Broadcast, is_main_process
from grok1.generation.metrics import EngineMetrics, copy_histogram
from grok1.generation.requests import Delta, Request
from grok1.generation.runner import Runner, runner_for
from grok1.generation.scoring import (MIN_SCORE_BUDGET, ScoreJob, batch_tokens, next_batch, scores_of,
                                      top_n_step)
from grok1.generation.settings import FittedPrompt, SamplingSettings, draw_fresh_seeds, fit_prompt
from grok1.generation.steps import SlotState
from grok1.mesh import to_host

DEFAULT_SLOTS = 4
# A prefill bucket, so that a shorter prompt, padded to its bucket, is never longer than a chunk.
DEFAULT_PREFILL_CHUNK = 128
DEFAULT_MAX_WAITING = 256


class EngineError(RuntimeError):
    """A request ended without finishing: the engine shut down or the device step failed."""


class EngineClosed(EngineError):
    """The engine is shutting down (or has): the request was not, or not fully, served."""


class QueueFull(RuntimeError):
    """Too many requests wait for a slot; try again later."""


Deliver = Callable[[Any], None]   # called on the engine thread with each Delta, or an EngineError


@dataclasses.dataclass(eq=False)
class Job:
    """One submitted request: its prompt, settings and progress, and where its Deltas go.
    `deliver` runs on the engine thread and must not block (put on a queue, or
    loop.call_soon_threadsafe)."""

    prompt: list[int]
    settings: SamplingSettings
    deliver: Deliver
    progress: Request
    id: int
    submitted_at: float
    first_token_at: Optional[float] = None
    last_token_at: Optional[float] = None
    cancelled: bool = False
    done: bool = False
    prefilled: int = 0          # prompt tokens scheduled into the slot's cache so far

    @property
    def decoding(self) -> bool:
        """Its whole prompt is in the cache: decode calls advance it."""
        return self.prefilled >= len(self.prompt)


# ---- the engine -------------------------------------------------------------------------------

class Engine:
    """Continuous batching for requests that arrive at any time (see the module docstring).

    `prefill_chunk`: prompts longer than this are prefilled in chunks of this many tokens, one per
    step while others decode (it should divide the context length; otherwise prompts go whole).
    Without `runner`, the engine uses the jitted steps of the model's Runner (`runner_for`, so
    both compile once) with a cache of its own; with `runner`, it owns that runner and its cache
    (`engine_for` does this for `generate` and `stream`).
    Start it with `start()` (or use it as a context manager); `close()` ends every running and
    waiting request with EngineClosed and stops the thread. With `lead_followers` on a cluster,
    process 0's engine takes the requests and the other processes call `follow()` (module docstring).
    """

    def __init__(self, model: Any, slots: int = DEFAULT_SLOTS, decode_chunk: int = 1,
                 max_waiting: int = DEFAULT_MAX_WAITING, runner: Optional[Runner] = None,
                 lead_followers: bool = False, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        sequence_len = model.config.sequence_len
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        # Chunks start at multiples of the chunk size, so that one never runs past the cache's
        # end; a size that does not divide the context prefills every prompt whole.
        self.prefill_chunk = int(prefill_chunk) if sequence_len % prefill_chunk == 0 else sequence_len
        self.model = model
        if runner is not None:
            self.runner, self._cache_holder = runner, runner
        else:
            self.runner = (runner_for(model, slots) if decode_chunk == 1
                           else Runner(model, slots, decode_chunk=decode_chunk))
            self._cache_holder = _CacheHolder()
        self.slots = self.runner.slots
        self.max_waiting = int(max_waiting)
        self.metrics = EngineMetrics(slots=self.slots)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[Job] = collections.deque()
        self._scoring: collections.deque[ScoreJob] = collections.deque()   # they need no slot
        self._scoring_now: list[ScoreJob] = []
        self._ids = itertools.count()
        self._closing = False
        self._thread: Optional[threading.Thread] = None
        # With several processes and lead_followers: the schedule each step, process 0 -> others.
        self._schedule: Optional[Broadcast] = None
        self._told_stop = False
        if lead_followers and jax.process_count() > 1:
            self._schedule = Broadcast("engine-schedule")

    @property
    def _state(self) -> Optional[SlotState]:
        return self._cache_holder._state

    @_state.setter
    def _state(self, state: Optional[SlotState]) -> None:
        self._cache_holder._state = state

    # ---- life cycle ----

    def start(self) -> "Engine":
        """Start the engine thread (idempotent)."""
        with self._lock:
            if self._closing:
                raise EngineClosed("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="grok1-engine", daemon=True)
                self._thread.start()
                _STARTED.add(self)
        return self

    def close(self, timeout: Optional[float] = 30.0) -> None:
        """Stop taking requests, end running and waiting ones with EngineClosed, join the thread."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if thread is None:
            self._tell_followers_to_stop("closed")
        with self._lock:   # never started: nobody else will end the waiting requests
            waiting, self._waiting = [*self._waiting, *self._scoring], collections.deque()
            self._scoring = collections.deque()
            self.metrics.waiting = 0
        for job in waiting:
            self._end(job, EngineClosed("the server is shutting down"), reason="aborted")

    def warm_up(self) -> None:
        """Compile (or load from the compilation cache) the device steps a request can need, so
        that the first one does not wait for them: the prefill of each bucket a whole prompt may
        take, a chunk of a longer prompt, the first token's sampling and the decode call, each
        run once on a scratch state that is then dropped (the engine's own state stays as it
        was). Call it before `start()`; on a cluster, on every process (the steps are collective)."""
        if self._thread is not None:
            raise RuntimeError("warm_up() goes before start(): the engine thread owns the state")
        buckets, chunk = self.runner.buckets, self.prefill_chunk
        whole = [b for b in buckets if b < chunk] + [min(b for b in buckets if b >= chunk)]
        settings, pad = _device_settings(SamplingSettings(seed=0)), self.model.config.pad_token
        kept, self._state = self._state, self.runner._fresh_state()
        try:
            for bucket in whole:
                self._state = self._prefill(0, [pad] * bucket, *settings)[0]
            if chunk < self.model.config.sequence_len:   # longer prompts go in chunks
                self._state = self._prefill_chunk(0, [pad], 0, 1, *settings)[0]
            self._state = self.runner.decode(self.model.params, self._state)[0]
            jax.block_until_ready(self._state)
        finally:
            self._state = kept

    @property
    def closing(self) -> bool:
        return self._closing

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests ----

    def fit(self, prompt: Any, settings: SamplingSettings) -> FittedPrompt:
        """The prompt checked and fitted into the context as `settings.fit_prompt` does
        (ValueError on bad input, or on a prompt or max_new_tokens that do not fit when strict)."""
        return fit_prompt(prompt, self.model.config, self.model.tokenizer, settings)

    def submit(self, requests: Sequence[tuple[list[int], SamplingSettings, Deliver]],
               bounded: bool = True) -> list[Job]:
        """Queue (prompt ids, settings, deliver) requests, all or none: QueueFull when they do
        not fit in the waiting queue (unless not `bounded`), EngineClosed when shutting down. A
        request without a seed gets a fresh one. `deliver` receives each Delta (the last has a finish_reason) or, if the
        request cannot finish, one EngineError."""
        config, tokenizer = self.model.config, self.model.tokenizer
        # A leading engine's followers get the seeds in the schedule, not by a draw of their own.
        fresh = iter(draw_fresh_seeds(sum(s.seed is None for _, s, _ in requests),
                                      across_processes=self._schedule is None))
        jobs = []
        now = time.monotonic()
        for prompt, settings, deliver in requests:
            if settings.seed is None:
                settings = dataclasses.replace(settings, seed=next(fresh))
            if not prompt or len(prompt) >= config.sequence_len:
                raise ValueError(f"prompt ids must number 1 to {config.sequence_len - 1} "
                                 f"(fit them with Engine.fit), got {len(prompt)}")
            jobs.append(Job(prompt=list(prompt), settings=settings, deliver=deliver,
                            progress=Request(list(prompt), settings, config, tokenizer),
                            id=0, submitted_at=now))
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            if bounded and len(self._waiting) + len(jobs) > self.max_waiting + self.metrics.free:
                raise QueueFull(f"{len(self._waiting)} requests wait for a slot "
                                f"(at most {self.max_waiting})")
            for job in jobs:
                job.id = next(self._ids)
                self._waiting.append(job)
            self.metrics.waiting = len(self._waiting)
            self._wake.notify_all()
        return jobs

    def submit_scores(self, requests: Sequence[tuple[list[int], int, Deliver]],
                      bounded: bool = True) -> list[ScoreJob]:
        """Queue (prompt ids, top_n, deliver) scoring requests as `submit` queues generation ones
        (module docstring); `deliver` receives one Score (grok1/generation/scoring.py) or an EngineError."""
        sequence_len = self.model.config.sequence_len
        if not all(0 < len(prompt) <= sequence_len for prompt, _, _ in requests):
            raise ValueError(f"prompt ids to score must number 1 to {sequence_len} (scored_prompt_ids)")
        jobs = [ScoreJob(prompt=[int(t) for t in p], top_n=int(n), deliver=d) for p, n, d in requests]
        with self._lock:
            if self._closing:
                raise EngineClosed("the server is shutting down")
            waiting = len(self._waiting) + len(self._scoring)
            if bounded and waiting + len(jobs) > self.max_waiting + self.metrics.free:
                raise QueueFull(f"{waiting} requests wait (at most {self.max_waiting})")
            for job in jobs:
                job.id = next(self._ids)
                self._scoring.append(job)
            self._wake.notify_all()
        return jobs

    def cancel(self, job: Job | ScoreJob) -> None:
        """Stop a request: it receives nothing more, and its slot is free after the decode call
        in progress (or it leaves the queue)."""
        with self._lock:
            job.cancelled = True
            self._wake.notify_all()

    def stream(self, prompt: list[int], settings: SamplingSettings) -> Iterator[Delta]:
        """A blocking client: Deltas of one request (prompt ids as `fit` returns them).
        Closing the iterator early cancels the request."""
        deltas: queue.SimpleQueue = queue.SimpleQueue()
        [job] = self.submit([(prompt, settings, deltas.put)])
        try:
            while True:
                item = deltas.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if not job.done:
                self.cancel(job)

    def run(self, requests: Sequence[tuple[list[int], SamplingSettings]]
            ) -> Iterator[tuple[int, Delta, Request]]:
        """A blocking client: generate every (prompt ids, settings)
        request, yielding (request index, delta, progress) as tokens arrive, in order within each
        request. Requests are queued whatever the bound; closing the iterator cancels them."""
        results: queue.SimpleQueue = queue.SimpleQueue()
        deliver = lambda index: (lambda item: results.put((index, item)))
        jobs = self.submit([(prompt, settings, deliver(i)) for i, (prompt, settings) in enumerate(requests)],
                           bounded=False)
        try:
            remaining = len(jobs)
            while remaining:
                index, item = results.get()
                if isinstance(item, Exception):
                    raise item
                yield index, item, jobs[index].progress
                remaining -= item.finish_reason is not None
        finally:
            for job in jobs:
                if not job.done:
                    self.cancel(job)

    def snapshot(self) -> EngineMetrics:
        """A consistent copy of the metrics."""
        with self._lock:
            m = self.metrics
            return dataclasses.replace(m, finished=collections.Counter(m.finished),
                                       time_to_first_token=copy_histogram(m.time_to_first_token),
                                       time_per_output_token=copy_histogram(m.time_per_output_token))

    # ---- the engine thread ----

    def _loop(self) -> None:
        slot_of: list[Optional[Job]] = [None] * self.slots
        in_flight: collections.deque = collections.deque()   # (kind, {slot: job}, device arrays)
        while True:
            with self._lock:
                while not (self._closing or self._waiting or self._scoring or in_flight
                           or any(job is not None for job in slot_of)):
                    self._wake.wait()
                if self._closing:
                    break
                admitted = self._admit(slot_of)
            try:
                self._step(slot_of, admitted, in_flight)
            except Exception as error:   # a failed device call: end its requests, keep serving
                for job in [*{id(j): j for j in slot_of if j is not None}.values(), *self._scoring_now]:
                    self._end(job, EngineError(f"generation failed: {error}"), reason="error")
                slot_of = [None] * self.slots
                in_flight.clear()
                self._state = None
                with self._lock:
                    self.metrics.running = 0
                if self._schedule is not None:   # followers cannot know how far the step got
                    self._tell_followers_to_stop("failed")
                    with self._lock:
                        self._closing = True
                    break
        self._tell_followers_to_stop("closed")
        with self._lock:
            scoring, self._scoring = [*slot_of, *self._scoring], collections.deque()
        for job in scoring:
            if job is not None:
                self._end(job, EngineClosed("the server is shutting down"), reason="aborted")
        with self._lock:
            self.metrics.running = 0

    def _admit(self, slot_of: list[Optional[Job]]) -> list[tuple[int, Job]]:
        """(Under the lock.) Free the slots of cancelled requests and pick the newcomers for free
        slots: all that fit when nothing is decoding, else one."""
        for slot, job in enumerate(slot_of):
            if job is not None and (job.cancelled or job.done):
                if job.cancelled and not job.done:
                    job.done = True
                    self.metrics.finished["cancelled"] += 1
                slot_of[slot] = None
        busy = any(job is not None for job in slot_of)
        admitted = []
        for slot in range(self.slots):
            if slot_of[slot] is not None:
                continue
            while self._waiting and self._waiting[0].cancelled:
                self._waiting.popleft().done = True
                self.metrics.finished["cancelled"] += 1
            if not self._waiting or (busy and admitted):
                break
            job = self._waiting.popleft()
            slot_of[slot] = job
            admitted.append((slot, job))
        self.metrics.waiting = len(self._waiting)
        self.metrics.running = sum(job is not None for job in slot_of)
        return admitted

    def _step(self, slot_of: list[Optional[Job]], admitted: list[tuple[int, Job]],
              in_flight: collections.deque) -> None:
        """Prefill the newcomers (one chunk or short prompt per step while others decode),
        dispatch one decode call, read all results but its own."""
        with self._lock:
            self.metrics.prompt_tokens += sum(len(job.prompt) for _, job in admitted)
        prefilling = sorted(((job.id, slot, job) for slot, job in enumerate(slot_of)
                             if job is not None and not job.decoding), key=lambda t: t[0])
        if any(job is not None and job.decoding for job in slot_of):
            prefilling = prefilling[:1]
        schedule: dict[str, Any] = {"prefill": []}
        snapshots: list[dict[int, Job]] = []
        for _, slot, job in prefilling:
            start = job.prefilled
            whole = start == 0 and len(job.prompt) <= self.prefill_chunk
            piece = job.prompt if whole else job.prompt[start:start + self.prefill_chunk]
            job.prefilled = start + len(piece)
            schedule["prefill"].append([slot, piece, start, len(job.prompt), *_device_settings(job.settings)])
            if job.decoding:   # its first token is sampled by this call
                snapshots.append({slot: job})
        schedule["decode"] = any(job is not None and job.decoding for job in slot_of)
        with self._lock:
            self._scoring_now = next_batch(self._scoring, self.prefill_chunk if schedule["decode"] else
                                           max(MIN_SCORE_BUDGET, self.model.config.sequence_len),
                                           self.runner.buckets)
            self.metrics.prompt_tokens += sum(len(job.prompt) for job in self._scoring_now)
        if self._scoring_now:
            schedule["score"] = [[job.prompt for job in self._scoring_now],
                                 top_n_step(self._scoring_now[0].top_n)]
            snapshots.append(self._scoring_now)
        if schedule["decode"]:
            snapshots.append({s: j for s, j in enumerate(slot_of) if j is not None and j.decoding})
        if self._schedule is not None:
            self._schedule.publish(schedule)
        for kind, snapshot, tokens, logprobs, *top in self._device_step(schedule, snapshots, in_flight):
            if kind == "score":
                for job, score in zip(snapshot, scores_of([j.prompt for j in snapshot],
                                                          [j.top_n for j in snapshot], tokens, logprobs, *top)):
                    if not job.cancelled:
                        job.done = True
                        self._send(job, score)
                with self._lock:
                    self.metrics.finished["scored"] += len(snapshot)
                continue
            if kind == "prefill":
                tokens, logprobs = tokens.reshape(1, 1), logprobs.reshape(1, 1)
            for step in range(tokens.shape[0]):
                now = time.monotonic()
                for slot, job in snapshot.items():
                    if job.done or job.cancelled:
                        continue
                    column = 0 if kind == "prefill" else slot
                    delta = job.progress.add(int(tokens[step, column]), float(logprobs[step, column]))
                    self._record(job, delta, now)
                    if delta.finish_reason is not None:
                        job.done = True
                        if slot_of[slot] is job:
                            slot_of[slot] = None
                    self._send(job, delta)

    def _device_step(self, schedule: dict, snapshots: Sequence[Any], in_flight: collections.deque
                     ) -> list[tuple[str, Any, np.ndarray, np.ndarray]]:
        """The device side of one step, the same on every process: each prefill of `schedule`
        ([slot, token ids, start, prompt length, settings...]: a whole prompt, or one chunk of
        it), a decode call if it says so, then the results of every call but that one are read
        -> [(kind, snapshot, tokens, logprobs)] in call order ("score": + top ids, logprobs).
        `snapshots` (one per call whose results count: final prefills, the scoring batch and the
        decode; none on a follower) travel with them."""
        if self._state is None and (schedule["prefill"] or schedule["decode"]):   # scoring needs none
            self._state = self.runner._fresh_state()
        snapshots = iter(snapshots)
        for slot, ids, start, length, *settings in schedule["prefill"]:
            if start == 0 and len(ids) == length:
                self._state, token, logprob = self._prefill(slot, ids, *settings)
            else:
                self._state, token, logprob = self._prefill_chunk(slot, ids, start, length, *settings)
            if start + len(ids) >= length:
                in_flight.append(("prefill", next(snapshots, None), (token, logprob)))
        if "score" in schedule:
            prompts, top_n = schedule["score"]
            arrays = self.runner.score(self.model.params, batch_tokens(
                prompts, self.runner.buckets, self.model.config.pad_token), top_n)
            in_flight.append(("score", next(snapshots, None), arrays))
        if schedule["decode"]:
            self._state, tokens, logprobs = self.runner.decode(self.model.params, self._state)
            in_flight.append(("decode", next(snapshots, None), (tokens, logprobs)))
        results = []
        while len(in_flight) > (1 if schedule["decode"] else 0):
            kind, snapshot, arrays = in_flight.popleft()
            results.append((kind, snapshot, *(to_host(a) for a in arrays)))
        return results

    def follow(self) -> None:
        """On a process other than 0 of a cluster: make the device calls of process 0's leading
        engine, step by step as it publishes them, until it stops (return) or fails (EngineError).
        Blocks in the key-value store between steps, however long the server stays idle."""
        if self._schedule is None or is_main_process():
            raise RuntimeError("follow() runs on processes other than 0 of a cluster, "
                               "on an engine built with lead_followers=True")
        in_flight: collections.deque = collections.deque()
        while True:
            schedule = self._schedule.receive()
            if "stop" in schedule:
                if schedule["stop"] == "failed":
                    raise EngineError("process 0's engine step failed; this process stops with it")
                return
            self._device_step(schedule, [], in_flight)

    def _tell_followers_to_stop(self, why: str) -> None:
        if self._schedule is not None and is_main_process() and not self._told_stop:
            self._told_stop = True
            self._schedule.publish({"stop": why})

    def _prefill_chunk(self, slot: int, ids: list[int], start: int, length: int, seed: int,
                       temperature: float, top_p: float, top_k: int, frequency_penalty: float,
                       presence_penalty: float):
        """`steps.prefill_chunk` of prompt positions [start, start + len(ids)), padded to a chunk."""
        padded = np.full((1, self.prefill_chunk), self.model.config.pad_token, np.int32)
        padded[0, :len(ids)] = ids
        return self.runner.prefill_chunk(
            self.model.params, self._state, padded, np.int32(start), np.int32(length), np.int32(slot),
            np.uint32(seed), np.float32(temperature), np.float32(top_p), np.int32(top_k),
            np.float32(frequency_penalty), np.float32(presence_penalty))

    def _prefill(self, slot: int, prompt: list[int], seed: int, temperature: float, top_p: float,
                 top_k: int, frequency_penalty: float, presence_penalty: float):
        """`Runner._prefill` on the engine's state: the prompt padded to its bucket."""
        bucket = next(b for b in self.runner.buckets if b >= len(prompt))
        padded = np.full((1, bucket), self.model.config.pad_token, np.int32)
        padded[0, :len(prompt)] = prompt
        return self.runner.prefill(
            self.model.params, self._state, padded, np.int32(len(prompt)), np.int32(slot),
            np.uint32(seed), np.float32(temperature), np.float32(top_p), np.int32(top_k),
            np.float32(frequency_penalty), np.float32(presence_penalty))

    def _record(self, job: Job, delta: Delta, now: float) -> None:
        with self._lock:
            m = self.metrics
            m.generated_tokens += 1
            if job.first_token_at is None:
                job.first_token_at = now
                m.time_to_first_token.observe(now - job.submitted_at)
            else:
                m.time_per_output_token.observe(now - job.last_token_at)
            job.last_token_at = now
            if delta.finish_reason is not None:
                m.finished[delta.finish_reason] += 1
                m.running = max(0, m.running - 1)

    def _send(self, job: Job, item: Any) -> None:
        try:
            job.deliver(item)
        except Exception:   # a receiver that cannot take more: treat it as gone
            job.cancelled = True

    def _end(self, job: Job, error: EngineError, reason: str) -> None:
        if job.done:
            return
        job.done = True
        with self._lock:
            self.metrics.finished[reason] += 1
        self._send(job, error)


# Engines still running when the interpreter exits are closed first, so their thread is not cut
# off in the middle of a device call while Python tears down.
_STARTED: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_started_engines() -> None:
    for engine in list(_STARTED):
        engine.close(timeout=10)


def _device_settings(settings: SamplingSettings) -> list:
    """The sampling settings the device calls take, in `Engine._prefill`'s order (JSON-able)."""
    return [settings.seed, settings.temperature, settings.top_p, settings.top_k,
            settings.frequency_penalty, settings.presence_penalty]


class _CacheHolder:
    _state: Optional[SlotState] = None


_ENGINES_LOCK = threading.Lock()


def engine_for(model: Any, slots: int) -> Engine:
    """The model's engine on `runner_for(model, slots)`, started once and cached on the model:
    what `generate` and `stream` submit to."""
    with _ENGINES_LOCK:
        engines = model.__dict__.setdefault("_engines", {})
        engine = engines.get(slots)
        if engine is None or engine.closing:
            engine = engines[slots] = Engine(model, slots, runner=runner_for(model, slots)).start()
        return engine
