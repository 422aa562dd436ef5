"""The engine: admits requests, runs steps, streams token events.

``Engine`` is synchronous and single-threaded: ``add_request``, ``abort``, ``step``.
Each step schedules (continuous batching over the paged cache), runs one forward, samples
a token for every sequence whose pending tokens it completed, detokenizes, checks the
stopping criteria (TGI's order: max_new_tokens, then EOS, then stop sequences) and
returns the step's :class:`TokenEvent`s. A failing step fails its own requests with an
error event; the engine goes on with the others.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

import torch

from tgi_core.engine.block_manager import BlockManager
from tgi_core.engine.detokenizer import IncrementalDetokenizer
from tgi_core.engine.model_runner import ModelRunner
from tgi_core.engine.requests import (
    FinishReason,
    GenerateRequest,
    PromptToken,
    StoppingParams,
    TokenEvent,
    TopToken,
)
from tgi_core.engine.sampler import is_sampling, sample
from tgi_core.engine.scheduler import ScheduledChunk, Scheduler
from tgi_core.engine.sequence import Sequence
from tgi_core.errors import TGIError
from tgi_core.logging import get_logger

log = get_logger("tgi_core.engine")


class RequestError(TGIError):
    """A request the engine cannot take (the server answers 422)."""


@dataclass(frozen=True)
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_batch_tokens: int = 4096
    max_batch_size: int | None = None
    chunked_prefill: bool = True
    prefix_caching: bool = True
    eos_token_ids: tuple[int, ...] = ()
    #: encoder-decoder models: the decoder's first token (the prompt goes to the encoder)
    decoder_start_token_id: int | None = None


@dataclass
class EngineStats:
    queue_size: int
    batch_size: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    prefix_hit_tokens: int
    preemptions: int


class Engine:
    """Continuous batching of generation requests over one model."""

    def __init__(self, runner: ModelRunner, config: EngineConfig, tokenizer: Any = None) -> None:
        self.runner, self.config, self.tokenizer = runner, config, tokenizer
        self.blocks = BlockManager(
            config.num_blocks, config.block_size, prefix_caching=config.prefix_caching
        )
        self.scheduler = Scheduler(
            self.blocks,
            max_batch_tokens=config.max_batch_tokens,
            max_batch_size=config.max_batch_size,
            chunked_prefill=config.chunked_prefill,
        )
        self.sequences: dict[str, list[Sequence]] = {}  # a request's live samples
        self._arrivals = 0
        #: Called after each step that ran a forward with ``(method, seconds, batch_size,
        #: ok)``: method ``"prefill"`` if any chunk was a prefill chunk, else ``"decode"``.
        #: Runs on the engine thread; an exception it raises is logged and ignored.
        self.step_observer: Callable[[str, float, int, bool], None] | None = None

    @property
    def capacity_tokens(self) -> int:
        return self.config.num_blocks * self.config.block_size

    def add_request(self, request: GenerateRequest) -> None:
        """Queue ``request``; raises RequestError for one that can never be served."""
        if not request.prompt_token_ids:
            raise RequestError("the prompt is empty")
        if request.request_id in self.sequences:
            raise RequestError(f"request id {request.request_id!r} is already in flight")
        total = self._kv_positions(request)
        if total > self.capacity_tokens:
            raise RequestError(
                f"prompt and max_new_tokens ({total} tokens) exceed the KV "
                f"cache ({self.capacity_tokens} tokens)"
            )
        if request.n < 1:
            raise RequestError("n must be at least 1")
        if request.n * total > self.capacity_tokens:
            raise RequestError(
                f"{request.n} samples of {total} tokens exceed the KV cache "
                f"({self.capacity_tokens} tokens)"
            )
        seq = self._new_sequence(request, self._arrivals)
        seq.extra["arrived_at"] = time.perf_counter()
        self._arrivals += 1
        self._prepare(seq, 0)
        self.sequences[request.request_id] = [seq]
        self.scheduler.add(seq)

    def _kv_positions(self, request: GenerateRequest) -> int:
        """Cache positions a request can come to need (per sample)."""
        prompt, new = len(request.prompt_token_ids), request.stopping.max_new_tokens
        if self.config.decoder_start_token_id is None:
            return prompt + new
        return max(prompt, 1 + new)

    def _new_sequence(self, request: GenerateRequest, arrival: int) -> Sequence:
        start = self.config.decoder_start_token_id
        if start is None:
            return Sequence(request, arrival=arrival)
        return Sequence(
            request, arrival=arrival, token_ids=[start], encoder_ids=request.prompt_token_ids
        )

    def _prepare(self, seq: Sequence, index: int) -> None:
        """Per-sample state: its index, its seeded generator, its detokenizer."""
        request, sampling = seq.request, seq.request.sampling
        seq.extra["index"] = index
        if is_sampling(sampling):
            base = sampling.seed if sampling.seed is not None else random.getrandbits(63)
            seed = (base + index) % 2**64
            seq.extra["seed"] = seed
            seq.extra["generator"] = torch.Generator().manual_seed(seed)
        if self.tokenizer is not None:
            seq.extra["detokenizer"] = IncrementalDetokenizer(
                self.tokenizer, seq.token_ids[: seq.num_prompt_tokens], request.stopping.stop
            )

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its blocks are free when this returns."""
        group = self.sequences.pop(request_id, None)
        if group is None:
            return False
        for seq in group:
            self.scheduler.finish(seq)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        return EngineStats(
            queue_size=len(self.scheduler.waiting),
            batch_size=len(self.scheduler.running),
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used,
            kv_blocks_cached=self.blocks.num_cached,
            prefix_hit_tokens=self.blocks.prefix_hit_tokens,
            preemptions=self.scheduler.num_preemptions,
        )

    def step(self) -> list[TokenEvent]:
        """Run one step; returns the token events it produced."""
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        events = [
            self._fail(seq, "the request does not fit in the KV cache") for seq in plan.refused
        ]
        if not plan.chunks:
            return events
        prefill = any(c.num_new > 1 or c.num_cached < c.seq.num_prompt_tokens for c in plan.chunks)
        for chunk in plan.chunks:  # a request's queue time ends when it is first scheduled
            chunk.seq.extra.setdefault(
                "queue_time", start - chunk.seq.extra.get("arrived_at", start)
            )
        try:
            events += self._run(plan.chunks)
        except Exception as exc:  # a failed step fails its requests, not the engine
            log.exception("step failed", requests=[c.seq.request_id for c in plan.chunks])
            failed = {c.seq.request_id: c.seq for c in plan.chunks}
            events += [
                self._fail(seq, f"generation failed: {exc}")
                for seq in failed.values()
                if seq.request_id in self.sequences
            ]
            self._observe_step(prefill, start, len(plan.chunks), ok=False)
            return events
        self._observe_step(prefill, start, len(plan.chunks), ok=True)
        return events

    def _observe_step(self, prefill: bool, start: float, batch_size: int, ok: bool) -> None:
        if self.step_observer is None:
            return
        method = "prefill" if prefill else "decode"
        try:
            self.step_observer(method, time.perf_counter() - start, batch_size, ok)
        except Exception:  # metrics never break a step
            log.exception("step observer failed")

    def _run(self, chunks: list[ScheduledChunk]) -> list[TokenEvent]:
        """Forward, then sample and emit for the sequences whose pending tokens are done."""
        self.runner.copy_blocks(self.blocks.take_copies())
        modes = [self._logits_mode(c) for c in chunks]
        logits = self.runner.execute(chunks, modes)
        ready: list[tuple[Sequence, torch.Tensor]] = []
        for chunk, mode, rows in zip(chunks, modes, logits, strict=True):
            self.scheduler.complete(chunk)
            if mode == "all":
                self._record_prompt_logprobs(chunk, rows)
            if chunk.seq.num_pending == 0 and rows is not None:
                ready.append((chunk.seq, rows[-1]))
                ready.extend((child, rows[-1]) for child in self._fork(chunk.seq))
        if not ready:
            return []
        return self._sample([seq for seq, _ in ready], _stack_rows([row for _, row in ready]))

    def _logits_mode(self, chunk: ScheduledChunk) -> str:
        seq = chunk.seq
        if seq.request.prompt_logprobs and chunk.num_cached < seq.num_prompt_tokens:
            return "all"
        return "last" if chunk.num_cached + chunk.num_new == len(seq.token_ids) else "none"

    def _record_prompt_logprobs(self, chunk: ScheduledChunk, rows: torch.Tensor | None) -> None:
        seq = chunk.seq
        assert rows is not None
        recorded = seq.extra.setdefault("prompt_logprobs", [PromptToken(seq.token_ids[0], None)])
        log_probs = rows.float().log_softmax(-1)
        for offset in range(chunk.num_new):
            target = chunk.num_cached + offset + 1
            if target < seq.num_prompt_tokens and target == len(recorded):
                token = seq.token_ids[target]
                recorded.append(PromptToken(token, float(log_probs[offset, token])))

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The first time a request's prompt completes, start its other ``n - 1`` samples."""
        if parent.request.n == 1 or parent.extra.get("forked"):
            return []
        parent.extra["forked"] = True
        children = []
        for index in range(1, parent.request.n):
            child = Sequence(
                parent.request,
                arrival=parent.arrival,
                token_ids=list(parent.token_ids),
                encoder_ids=parent.encoder_ids,
            )
            self._prepare(child, index)
            self.blocks.fork(parent, child)
            child.extra["forked"] = True
            if "prompt_logprobs" in parent.extra:
                child.extra["prompt_logprobs"] = parent.extra["prompt_logprobs"]
            self.scheduler.add_running(child)
            self.sequences[parent.request_id].append(child)
            children.append(child)
        return children

    def _sample(self, ready: list[Sequence], logits: torch.Tensor) -> list[TokenEvent]:
        out = sample(
            logits,
            [s.request.sampling for s in ready],
            [s.token_ids for s in ready],
            [s.extra.get("generator") for s in ready],
        )
        events = []
        for i, seq in enumerate(ready):
            token = out.token_ids[i]
            seq.token_ids.append(token)
            events.append(
                self._emit(
                    seq,
                    token,
                    out.logprobs[i],
                    zip(out.top_ids[i], out.top_logprobs[i], strict=True),
                )
            )
        return events

    def _emit(
        self, seq: Sequence, token: int, logprob: float, top: Iterable[tuple[int, float]]
    ) -> TokenEvent:
        stopping = seq.request.stopping
        detok: IncrementalDetokenizer | None = seq.extra.get("detokenizer")
        text = detok.add(token) if detok is not None else ""
        eos = set(stopping.stop_token_ids)
        if not stopping.ignore_eos:
            eos |= set(self.config.eos_token_ids)
        finish: FinishReason | None = None
        if seq.num_generated >= stopping.max_new_tokens:
            finish = "length"
        elif token in eos:
            finish = "eos_token"
        elif detok is not None and detok.stopped_by is not None:
            finish = "stop_sequence"
        done = False
        if finish is not None:
            if detok is not None and finish != "stop_sequence":
                text += detok.flush()
            done = self._retire(seq)
        prompt_logprobs = None
        if seq.num_generated == 1 and "prompt_logprobs" in seq.extra:
            prompt_logprobs = tuple(seq.extra["prompt_logprobs"])
        special = self._is_special(token)
        top_tokens = tuple(
            TopToken(i, self._token_text(i), lp, self._is_special(i)) for i, lp in top
        )
        return TokenEvent(
            request_id=seq.request_id,
            index=seq.extra.get("index", 0),
            token_id=token,
            text=text,
            logprob=logprob,
            special=special,
            top_tokens=top_tokens,
            finish_reason=finish,
            generated_tokens=seq.num_generated,
            prompt_tokens=len(seq.request.prompt_token_ids),
            seed=seq.extra.get("seed"),
            done=done,
            stop_sequence=detok.stopped_by if detok is not None else None,
            prompt_logprobs=prompt_logprobs,
            queue_time=seq.extra.get("queue_time", 0.0) if seq.num_generated == 1 else 0.0,
        )

    def _retire(self, seq: Sequence) -> bool:
        """Finish one sample; True when it was its request's last."""
        self.scheduler.finish(seq)
        group = self.sequences.get(seq.request_id, [])
        if seq in group:
            group.remove(seq)
        unforked = seq.request.n > 1 and not seq.extra.get("forked")
        if group or unforked:
            return False
        self.sequences.pop(seq.request_id, None)
        return True

    def _fail(self, seq: Sequence, message: str) -> TokenEvent:
        """Fail a whole request (all its samples) with one error event."""
        for sample_seq in self.sequences.pop(seq.request_id, [seq]):
            self.scheduler.finish(sample_seq)
        self.scheduler.finish(seq)
        return TokenEvent(
            request_id=seq.request_id,
            token_id=-1,
            text="",
            logprob=0.0,
            generated_tokens=seq.num_generated,
            prompt_tokens=len(seq.request.prompt_token_ids),
            error=message,
            done=True,
        )

    def _is_special(self, token: int) -> bool:
        special = getattr(self.tokenizer, "all_special_ids", None) or ()
        return token in special

    def _token_text(self, token: int) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode([token], skip_special_tokens=False)  # type: ignore[no-any-return]

    def warm_up(self) -> None:
        """Run the step shapes a compiled model specializes (several tokens, and one),
        so that compiling happens before the first request: a request alone, then two
        together. Their prompts skip the prefix cache; every block is freed after."""

        def request(name: str, length: int) -> GenerateRequest:
            return GenerateRequest(
                request_id=f"warm-up-{name}",
                prompt_token_ids=tuple(range(1, length + 1)),
                stopping=StoppingParams(max_new_tokens=2, ignore_eos=True),
                prompt_logprobs=True,
            )

        self.run([request("alone", 3)])
        self.run([request("first", 3), request("second", 2)])

    def run(
        self, requests: Seq[GenerateRequest], max_steps: int = 100_000
    ) -> dict[str, list[TokenEvent]]:
        """Serve ``requests`` to completion (offline use and tests)."""
        streams: dict[str, list[TokenEvent]] = {r.request_id: [] for r in requests}
        for request in requests:
            self.add_request(request)
        for _ in range(max_steps):
            if not self.has_work():
                return streams
            for event in self.step():
                streams[event.request_id].append(event)
        raise RuntimeError("requests did not finish")


def _stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(rows)`` of 1-D rows, without the copy when they are consecutive rows
    of one tensor, as a step's last-token logits are (64 x 49152 floats: ~3 ms a step)."""
    first = rows[0]
    width, storage, offset = (
        first.shape[0],
        first.untyped_storage().data_ptr(),
        first.storage_offset(),
    )
    consecutive = all(
        row.dim() == 1
        and row.shape[0] == width
        and row.stride(0) == 1
        and row.untyped_storage().data_ptr() == storage
        and row.storage_offset() == offset + i * width
        for i, row in enumerate(rows)
    )
    if consecutive:
        return first.as_strided((len(rows), width), (width, 1))
    return torch.stack(rows)
