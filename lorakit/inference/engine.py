"""The scheduler behind `lorakit serve`: one thread owns the model and batches at the level of
decoding steps (continuous batching).

At every step the loop installs adapters whose files have been read, admits waiting requests
(their prompts prefilled, up to a budget of tokens per step, a longer prompt in chunks over
several steps; then each joins the running rows whatever its adapter), runs one decoding step
for all running rows through the mixed-adapter path, and retires rows that finished or whose
client went away. A short request therefore never waits for a long one to finish, running rows
wait for at most one budget of prefill per step, and a cancelled request frees its row at the
next step.

Requests talk to the loop through `submit` and `cancel` (any thread) and receive `Event`s
through the callback they carry (called on the scheduler thread: keep it short).
"""

from __future__ import annotations

import contextlib
import inspect
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.compat import cache_argument, contiguous_head_input, new_kv_cache
from lorakit.errors import UserError
from lorakit.inference.adapters import AdapterFiles, AdapterNotFound, AdapterPool
from lorakit.inference.batch import DecodeBatch, Prefilled, join_prefilled, length_groups
from lorakit.lora import BASE_ADAPTER, LoraModel

# Padding tokens a prefill forward may carry to share it with another prompt: about what one
# more forward costs in fixed overhead, in tokens. On the default model (bf16, 2-core CPU) a
# forward has cost ~40 ms plus ~0.2 ms per token on a fast machine, ~15 ms plus ~0.65 ms on a
# slow one (bench/RESULTS.md); a smaller slack lowered the median TTFT there, not the p99.
PREFILL_PADDING_SLACK = 128

# Defaults of `lorakit serve`'s limits (the CLI and `server.build` take these).
MAX_BATCH = 16  # rows decoded together
MAX_WAITING = 256  # requests submitted and not yet admitted; more get QueueFull (HTTP 429)
# Prompt tokens prefilled between two decoding steps (a longer prompt goes in chunks). It bounds
# how long running rows wait for newcomers (~0.2-0.7 ms per token on the default model on a
# 2-core CPU) and spreads a burst of arrivals over several steps, so that requests which
# arrived together do not finish together and come back as a burst again (closed-loop
# clients): under 16 clients the TTFT tail is about half of what 2048 gives, at the same
# tokens/s (bench/RESULTS.md).
PREFILL_TOKENS_PER_STEP = 512


class QueueFull(UserError):
    """More requests are waiting than the server accepts (HTTP 429)."""


class Draining(UserError):
    """The server is shutting down and admits no new request (HTTP 503)."""


@dataclass(frozen=True)
class Sampling:
    """How one request picks its tokens; temperature 0 is greedy (argmax, as `generate`)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Event:
    """New text for a request; the last event of a request has `finish_reason` or `error`."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" (end of text, stop string) or "length"
    error: Exception | None = None
    # when each token new in this event was picked (time.monotonic()); text may lag behind
    # tokens (an incomplete character, a possible stop string), these times do not
    token_times: tuple[float, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """The scheduler's load at one moment: the adapters of the rows taken (decoding, or a
    prompt being prefilled in chunks) and of the requests waiting (BASE_ADAPTER: the base)."""

    running: tuple[str, ...]
    waiting: tuple[str, ...]
    waiting_count: int  # requests submitted and not yet admitted (also those not yet seen)
    max_rows: int


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    adapter: str  # BASE_ADAPTER: the base model
    sampling: Sampling
    on_event: Callable[[Event], None]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    # scheduler state
    generated: list[int] = field(default_factory=list)
    picked: list[float] = field(default_factory=list)  # times of tokens not yet in an event
    sent: int = 0  # characters of the decoded completion already sent
    adapter_missed: bool = False  # its adapter was not in the model when first looked at
    generator: torch.Generator | None = None
    done: bool = False
    # a prompt prefilled in chunks: its tokens in `cache` so far
    prefilled: int = 0
    cache: Any = None


class Engine:
    """Continuous batching over one `LoraModel` whose adapters live in an `AdapterPool`."""

    def __init__(
        self,
        model: LoraModel,
        tokenizer: Any,
        adapters: AdapterPool,
        max_batch: int = MAX_BATCH,
        max_waiting: int = MAX_WAITING,
        prefill_tokens_per_step: int = PREFILL_TOKENS_PER_STEP,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self._pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self.waiting: deque[Request] = deque()
        self.batch = DecodeBatch()
        self.partial: Request | None = None  # a long prompt being prefilled in chunks
        self._inbox: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._installs: queue.SimpleQueue[tuple[AdapterFiles, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._draining = False
        self._abort_with: Exception | None = None  # set by abort(), handled by the loop
        # the mixed-adapter batch the decoding steps run in, and its rows' adapters
        self._mixed = contextlib.ExitStack()
        self._mixed_key: tuple[str, ...] | None = None
        self._thread = threading.Thread(target=self._loop, name="lorakit-scheduler", daemon=True)
        self._waiting_count = 0  # requests submitted and not yet admitted or dropped
        self._count_lock = threading.Lock()  # submit runs on other threads
        self.steps = 0
        # the prefill needs the logits of the last position only (when the model can skip the
        # lm_head on the others: a vocabulary-sized product per prompt token)
        base = model.get_base_model()
        forward = inspect.signature(base.forward).parameters
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self._cache_argument = cache_argument(base)

    # -- any thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        if self._draining:
            raise Draining("the server is shutting down")
        if request.adapter != BASE_ADAPTER:
            self._adapter_path(request.adapter)
        with self._count_lock:
            if self._waiting_count >= self.max_waiting:
                raise QueueFull(f"{self._waiting_count} requests are already waiting")
            self._waiting_count += 1
        self._inbox.put(request)
        self._wake.set()

    def cancel(self, request: Request) -> None:
        """Drop the request at the next step (a client that went away)."""
        request.cancelled = True
        self._wake.set()

    def load_adapter(self, name: str, path: str) -> Future:
        """Read the adapter's files, then install it between two steps; a future for the result
        (None, or the error: unreadable files, a base that does not match)."""
        done: Future = Future()
        read = self.adapters.read(name, path, keep=False)

        def forward(f):
            if f.exception() is not None:
                done.set_exception(f.exception())
            else:
                self._installs.put((f.result(), done))
                self._wake.set()

        read.add_done_callback(forward)
        return done

    def unload_adapter(self, name: str) -> None:
        """Forget the adapter: requests may no longer name it, and it leaves the model once no
        running row uses it (raises `AdapterNotFound` if it is not known)."""
        self.adapters.forget(name)
        self._wake.set()

    def adapter_paths(self) -> dict[str, Path]:
        """The adapters requests may name, and the directory each is read from."""
        return self.adapters.known()

    def drain(self) -> None:
        """Admit nothing new; what is waiting or decoding goes on."""
        self._draining = True

    def abort(self, error: Exception) -> None:
        """End every waiting and running request with `error` at the next step."""
        self._abort_with = error
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.adapters.close()

    @property
    def busy(self) -> int:
        """Requests taken and not finished: waiting, being prefilled or decoding."""
        return self._waiting_count + self._rows()

    @property
    def running(self) -> int:
        """Rows decoding now."""
        return len(self.batch)

    def snapshot(self) -> Snapshot:
        """The load now, read from any thread without stopping the scheduler: a request
        admitted at that moment may be in neither list (good enough for a gauge)."""
        # tuple() of a list or deque copies it without letting another thread run meanwhile
        rows = tuple(self.batch.rows)
        partial = self.partial
        rows += (partial,) if partial is not None else ()
        return Snapshot(
            running=tuple(r.adapter for r in rows),
            waiting=tuple(r.adapter for r in tuple(self.waiting)),
            waiting_count=self._waiting_count,
            max_rows=self.max_batch,
        )

    # -- scheduler thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # a wake-up from here on is seen by the wait below
            self._take_inbox()
            if self._abort_with is not None:
                self._fail_all(self._abort_with)
                self._abort_with = None
            self._install_adapters()
            self._admit()
            if len(self.batch):
                try:
                    self._decode_step()
                except Exception as e:  # a failing model forward: end the rows, keep serving
                    self._fail_all(e)
            elif self.partial is None:
                self._wake.wait(0.05)
        self._fail_all(Draining("the server stopped before the request finished"))

    def _left_queue(self) -> None:
        with self._count_lock:
            self._waiting_count -= 1

    def _take_inbox(self) -> None:
        while True:
            try:
                self.waiting.append(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _install_adapters(self) -> None:
        while True:
            try:
                files, done = self._installs.get_nowait()
            except queue.Empty:
                break
            try:
                self.adapters.install(files)
            except Exception as e:
                done.set_exception(e)
            else:
                done.set_result(None)
        self.adapters.drop_forgotten()

    def _admit(self) -> None:
        """Prefill waiting requests (oldest first, together in one forward) while rows and the
        step's token budget last; a request whose adapter is not resident starts its load and
        lets others pass. A prompt longer than the budget is prefilled in chunks of the budget,
        one per step, alone (`_prefill_chunk`), so running rows never wait for more."""
        budget = self.prefill_tokens_per_step
        if self.partial is not None:  # it takes the budget, or what its last chunk leaves
            budget -= self._prefill_chunk(budget)
        tokens = 0
        chosen: list[Request] = []
        kept: deque[Request] = deque()
        slot_wanted = False  # an older request waits for an adapter slot
        while self.waiting:
            request = self.waiting.popleft()
            if request.cancelled:
                self._left_queue()
                continue
            # a prompt over the budget is chunked, and only as the step's first prefill
            over_budget = tokens + len(request.prompt_ids) > budget and (
                chosen or budget < self.prefill_tokens_per_step
            )
            # once a request waits for a slot, later ones may not pin adapters (they would
            # keep the slots busy for ever); base-model rows pin nothing and still pass
            if (
                self._rows() + len(chosen) >= self.max_batch
                or over_budget
                or (slot_wanted and request.adapter != BASE_ADAPTER)
            ):
                kept.append(request)
                continue
            try:
                state = self._adapter_ready(request)
            except Exception as e:  # unreadable, unloaded, or not for this base
                self._left_queue()
                self._finish(request, error=e)
                continue
            if state != "ready":
                slot_wanted = slot_wanted or state == "no slot"
                kept.append(request)
                continue
            self._left_queue()
            if request.adapter != BASE_ADAPTER:
                # pinned now: no later load evicts it
                self.adapters.use(request.adapter, hit=not request.adapter_missed)
            if request.sampling.seed is not None:
                request.generator = torch.Generator().manual_seed(request.sampling.seed)
            if len(request.prompt_ids) > budget:  # the first of this step, and too long
                self.partial = request
                self._prefill_chunk(budget)
                kept.extend(self.waiting)
                break
            chosen.append(request)
            tokens += len(request.prompt_ids)
        self.waiting = kept
        if chosen:
            try:
                self._prefill(chosen)
            except Exception as e:
                for request in chosen:
                    self._failed_prefill(request, e)

    def _rows(self) -> int:
        """Rows taken: the running ones and a prompt being prefilled in chunks."""
        return len(self.batch) + (self.partial is not None)

    def _failed_prefill(self, request: Request, error: Exception) -> None:
        self._finish(request, error=error)
        if request not in self.batch.rows:
            self._unpin(request)

    def _unpin(self, request: Request) -> None:
        """Release the adapter an admitted request pinned (at its end, or its client's)."""
        if request.adapter != BASE_ADAPTER:
            self.adapters.release(request.adapter)

    def _adapter_ready(self, request: Request) -> str:
        """ "ready" if the request's adapter is in the model; else its files are read in the
        background ("reading") and installed once read and a slot is free ("no slot" until
        then)."""
        name = request.adapter
        if name == BASE_ADAPTER or name in self.adapters.resident:
            return "ready"
        request.adapter_missed = True  # it waits for a load, or makes one now
        if not self.adapters.read(name, self._adapter_path(name)).done():
            return "reading"
        if not self.adapters.make_room():
            return "no slot"
        self.adapters.install(self.adapters.take_read(name))
        return "ready"

    def _adapter_path(self, name: str) -> Path:
        """Where the adapter a request names is read from: the one check of that name, when the
        request is submitted and again when it is admitted (the API may unload it meanwhile)."""
        path = self.adapters.known().get(name)
        if path is None:
            raise AdapterNotFound(
                f"the model '{name}' does not exist or was unloaded (GET /v1/models lists them)"
            )
        return path

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill the prompts, pick their first tokens and add their rows to the batch.

        Prompts of about the same length share one left-padded forward; the others get their
        own: a prompt padded to a longer one pays for every padding token, while another
        forward costs a fixed overhead (PREFILL_PADDING_SLACK tokens' worth). Within a forward the
        rows are grouped by adapter, so each adapter's update is computed on its own rows only
        (see `lorakit.lora.mixed`)."""
        self._close_mixed()
        rows: list[Request] = []
        parts: list[Prefilled] = []
        lengths = [len(r.prompt_ids) for r in requests]
        for group in length_groups(lengths, PREFILL_PADDING_SLACK):
            group_rows = sorted((requests[i] for i in group), key=lambda r: r.adapter)
            prefilled = self._forward_prompts(group_rows)
            # first tokens go out before the next group's forward
            for request, token in zip(group_rows, self._pick(prefilled.logits, group_rows)):
                self._accept(request, token)
            rows += group_rows
            parts.append(prefilled)
        self._join(rows, join_prefilled(parts))

    def _forward_prompts(self, requests: list[Request]) -> Prefilled:
        lengths = [len(r.prompt_ids) for r in requests]
        longest = max(lengths)
        ids = torch.tensor(
            [[self._pad_id] * (longest - n) + r.prompt_ids for r, n in zip(requests, lengths)]
        )
        mask = torch.arange(longest) >= torch.tensor([longest - n for n in lengths])[:, None]
        mask = mask.long()
        padding = {}
        if min(lengths) != longest:  # a prompt alone (or equal lengths) needs neither
            padding = dict(attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        cache = new_kv_cache()
        logits = self._forward(ids, [r.adapter for r in requests], cache, padding)
        return Prefilled(cache, mask, logits)

    def _prefill_chunk(self, budget: int) -> int:
        """Prefill the next `budget` tokens (at most) of `self.partial`'s prompt into its own
        cache; after the last chunk its row joins the batch. The tokens it used."""
        request = self.partial
        if request.cancelled:
            self.partial = None
            self._unpin(request)
            return 0
        if request.cache is None:
            request.cache = new_kv_cache()
        start = request.prefilled
        chunk = request.prompt_ids[start : start + budget]
        self._close_mixed()
        try:
            # no padding: the positions and the causal mask follow from the cache's length
            logits = self._forward(torch.tensor([chunk]), [request.adapter], request.cache, {})
        except Exception as e:
            self.partial = None
            self._failed_prefill(request, e)
            return len(chunk)
        request.prefilled += len(chunk)
        if request.prefilled == len(request.prompt_ids):
            self.partial = None
            prefilled = Prefilled(request.cache, torch.ones(1, request.prefilled).long(), logits)
            request.cache = None  # the batch owns it now
            self._accept(request, self._pick(logits, [request])[0])
            self._join([request], prefilled)
        return len(chunk)

    def _join(self, rows: list[Request], prefilled: Prefilled) -> None:
        """Add prefilled rows (their first tokens already picked) to the running batch."""
        self.batch.add(rows, prefilled)
        if any(r.done for r in rows):  # ended at their first token
            self._retire()

    def _forward(
        self, ids: torch.Tensor, adapters: list[str], cache: Any, padding: dict
    ) -> torch.Tensor:
        """One prefill forward of rows `ids` (each with its adapter) into `cache`; the logits
        of each row's last position."""
        with (
            torch.inference_mode(),
            self.model.mixed_adapter_batch(adapters, len(adapters), keep_slots=True),
            contiguous_head_input(self.model.get_base_model()),
        ):
            out = self.model(
                input_ids=ids,
                use_cache=True,
                **padding,
                **{self._cache_argument: cache},
                **self._last_only,
            )
        return out.logits[:, -1].float()

    def _decode_step(self) -> None:
        rows = self.batch.rows
        names = tuple(r.adapter for r in rows)
        if names != self._mixed_key:
            self._close_mixed()
            self._mixed.enter_context(
                self.model.mixed_adapter_batch(names, len(names), keep_slots=True)
            )
            self._mixed_key = names
        inputs = self.batch.step_inputs([r.generated[-1] for r in rows], self._cache_argument)
        with torch.inference_mode():
            logits = self.model(**inputs).logits[:, -1].float()
        self.steps += 1
        for request, token in zip(rows, self._pick(logits, rows)):
            if not request.cancelled:
                self._accept(request, token)
        self._retire()

    def _pick(self, logits: torch.Tensor, rows: list[Request]) -> list[int]:
        tokens = logits.argmax(-1).tolist()
        for i, request in enumerate(rows):
            if request.sampling.temperature > 0:
                tokens[i] = _sample(logits[i], request.sampling, request.generator)
        return tokens

    def _accept(self, request: Request, token: int) -> None:
        """Append a token, send the text that is final, and finish the request if it ended."""
        sampling = request.sampling
        if token in self.eos_ids:
            self._finish(request, reason="stop")
            return
        request.generated.append(token)
        request.picked.append(time.monotonic())
        text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
        cut = _first_stop(text, sampling.stop, request.sent)
        if cut is not None:
            self._finish(request, reason="stop", text=text[:cut])
        elif len(request.generated) >= sampling.max_tokens:
            self._finish(request, reason="length", text=text)
        else:
            # hold back an incomplete character and what could still become a stop string
            safe = len(text) - max((len(s) - 1 for s in sampling.stop), default=0)
            while safe > request.sent and text[safe - 1] == "\ufffd":
                safe -= 1
            if safe > request.sent:
                self._emit(request, self._event(request, text[request.sent : safe]))
                request.sent = safe

    def _finish(
        self,
        request: Request,
        reason: str | None = None,
        text: str | None = None,
        error: Exception | None = None,
    ) -> None:
        if request.done:
            return
        request.done = True
        if text is None and error is None:
            text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
        rest = "" if text is None else text[request.sent :]
        self._emit(request, self._event(request, rest, finish_reason=reason, error=error))

    def _event(self, request: Request, text: str, **end: Any) -> Event:
        """An event with the request's usage so far and the times of its tokens not yet sent."""
        times, request.picked = tuple(request.picked), []
        usage = len(request.prompt_ids), len(request.generated)
        return Event(text, *usage, token_times=times, **end)

    def _emit(self, request: Request, event: Event) -> None:
        if not request.cancelled:
            try:
                request.on_event(event)
            except Exception:  # a sink that fails (its client went away) ends the request
                request.cancelled = True

    def _retire(self) -> None:
        keep = []
        for i, request in enumerate(self.batch.rows):
            if request.done or request.cancelled:
                self._unpin(request)
            else:
                keep.append(i)
        if len(keep) != len(self.batch):
            self._close_mixed()
            self.batch.keep(keep)

    def _close_mixed(self) -> None:
        self._mixed.close()
        self._mixed = contextlib.ExitStack()
        self._mixed_key = None

    def _fail_all(self, error: Exception) -> None:
        self._take_inbox()
        self._close_mixed()
        pinned = list(self.batch.rows) + ([self.partial] if self.partial is not None else [])
        for request in pinned + list(self.waiting):
            self._finish(request, error=error)
            if request in pinned:
                self._unpin(request)
        self.batch.keep([])
        self.partial = None
        for _ in range(len(self.waiting)):
            self._left_queue()
        self.waiting.clear()


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids `generate` stops at: the generation config's, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _first_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Where the first stop string begins in `text` (searching only text not yet sent)."""
    found = [i for s in stops if (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(found) if found else None


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    probs = torch.softmax(logits / sampling.temperature, -1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > sampling.top_p  # keeps the top one
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
