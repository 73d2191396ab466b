"""Decoding concurrent chat answers together: one KV cache and one forward per step for every active answer.

    worker = make_worker(limits, engine)     # what `Emu2Server` runs; limits.max_batch_size 1 = one at a time
    decoder = BatchDecoder(engine)           # the engine inside it, usable on its own:
    decoder.join([BatchRequest(ChatCall(engine, prompt, settings), finish=print)]); decoder.step() ...

A step of a batch of B answers costs about what a step of one costs while the weights dominate memory traffic
(a 37B model on one GPU), so serial decoding wastes most of the hardware under load. Answers join continuously:
the requests waiting when a step ends are prefilled together (left-padded, as `Emu2Pipeline.encode`) into a cache
of their own, which is then left-padded to the running cache's length and stacked onto it; an answer that ends
(end token, stop string, max_tokens, cancelled or past its deadline) leaves at once and its rows are dropped.
Every row keeps its own sampling settings and random generator, so a seeded answer does not depend on what it
was batched with, and greedy answers equal the unbatched ones.

Beam search and n > 1 run alone through `ChatEngine` (transformers ``generate``), as does image generation.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..processing import USER
from .chat import (
    Answer,
    ChatEngine,
    ChatPrompt,
    DecodingSettings,
    StopScanner,
    _CallbackStreamer,
    _streamed_answer,
)
from .queue import Job, ModelWorker, settle_job

logger = logging.getLogger("emu2.serve")


@dataclass
class ChatCall:
    """One chat request for the model worker: decoded in a batch when it can be, alone when called.

    ``on_text`` makes it a streamed answer (the result is one `Answer`; without it, a list of ``n`` answers);
    ``on_done(result, error)`` is called on the model thread when it ends either way.
    """

    engine: ChatEngine
    prompt: ChatPrompt
    settings: DecodingSettings
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[Any, BaseException | None], None] | None = None

    @property
    def batchable(self) -> bool:
        """One sampled or greedy answer; beam search and n > 1 keep transformers' own search."""
        return self.settings.n == 1 and self.settings.num_beams == 1

    def __call__(self, cancel: threading.Event) -> Answer | list[Answer]:
        """The serial path: this request alone through `ChatEngine`."""
        try:
            if self.on_text is not None:
                result = self.engine.stream(self.prompt, self.settings, self.on_text, cancel)
            else:
                result = self.engine.answer(self.prompt, self.settings, cancel)
        except BaseException as error:
            self.done(None, error)
            raise
        self.done(result, None)
        return result

    def done(self, result: Any, error: BaseException | None) -> None:
        if self.on_done is not None:
            self.on_done(result, error)


@dataclass
class BatchRequest:
    """A `ChatCall` handed to `BatchDecoder`; ``finish(result, error)`` receives its outcome."""

    call: ChatCall
    finish: Callable[[Any, BaseException | None], None]
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")  # time.monotonic() past which the answer stops where it is


def _warpers(settings: DecodingSettings) -> LogitsProcessorList:
    """The logits warpers transformers ``generate`` applies for these settings, in its order."""
    kwargs = settings.generate_kwargs()
    warpers = LogitsProcessorList()
    if kwargs.get("temperature", 1.0) != 1.0:
        warpers.append(TemperatureLogitsWarper(kwargs["temperature"]))
    if kwargs.get("top_k"):
        warpers.append(TopKLogitsWarper(kwargs["top_k"]))
    if kwargs.get("top_p", 1.0) < 1.0:
        warpers.append(TopPLogitsWarper(kwargs["top_p"]))
    return warpers


class _Sequence:
    """One answer being decoded: its tokens so far, how it picks the next one, and where it stops."""

    def __init__(self, request: BatchRequest, engine: ChatEngine, device: torch.device):
        self.request, self.engine, self.error = request, engine, None
        settings = request.call.settings
        self.settings, self.tokens = settings, []
        self.warpers = _warpers(settings) if settings.sampling else None
        self.generator = None
        if settings.sampling and settings.seed is not None:
            self.generator = torch.Generator(device).manual_seed(settings.seed)
        self.stop = StopStringCriteria(engine.tokenizer, list(settings.stop)) if settings.stop else None
        self.streamer = self.scanner = None
        if request.call.on_text is not None:
            self.scanner = StopScanner(list(settings.stop), request.call.on_text)
            self.streamer = _CallbackStreamer(engine.tokenizer, self.scanner.feed, engine._drop_ids(),
                                              skip_special_tokens=not request.call.prompt.grounding)
            self.streamer.next_tokens_are_prompt = False  # the prompt never passes through it here

    def pick(self, logits: torch.Tensor) -> int:
        """``logits (V,)`` float32 -> the next token, sampled with this answer's settings and generator."""
        ids = torch.tensor([self.tokens], dtype=torch.long, device=logits.device)
        scores = self.warpers(ids, logits[None])
        return int(torch.multinomial(F.softmax(scores, dim=-1), 1, generator=self.generator))

    def add(self, token: int, eos: set[int]) -> bool:
        """Append ``token`` (streamed at once); True when the answer has ended."""
        self.tokens.append(token)
        if self.streamer is not None:
            self.streamer.put(torch.tensor([token]))
        if token in eos or len(self.tokens) >= self.settings.max_new_tokens:
            return True
        if self.stop is not None and bool(self.stop(torch.tensor([self.tokens]), None)[0]):
            return True
        return self.interrupted()

    def interrupted(self) -> bool:
        return self.request.cancel.is_set() or time.monotonic() > self.request.deadline

    def result(self) -> Answer | list[Answer]:
        """What `ChatEngine.stream` / `ChatEngine.answer` return for the same tokens."""
        if self.streamer is not None:
            self.streamer.end()
            return _streamed_answer(self.scanner, self.streamer, self.settings)
        return [self.engine._finish(self.tokens, self.settings, self.request.call.prompt.grounding)]


class BatchDecoder:
    """The answers being decoded by one chat model, their shared KV cache, and how many run per step.

    ``max_batch_size``: answers decoded together; ``max_batch_tokens``: prompt tokens prefilled in one forward
    (a single longer prompt is still prefilled, alone). ``decode_steps`` / ``sequence_steps`` count forwards and
    the answers they advanced: their ratio is the batching factor achieved.
    """

    def __init__(self, engine: ChatEngine, max_batch_size: int = 16, max_batch_tokens: int = 8192):
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise ValueError(f"max_batch_size ({max_batch_size}) and max_batch_tokens ({max_batch_tokens}) must "
                             "be at least 1")
        self.engine, self.max_batch_size, self.max_batch_tokens = engine, max_batch_size, max_batch_tokens
        self.model = engine.pipeline.model
        self.language_model = self.model.language_model
        eos = self.language_model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.sequences: list[_Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) 1 where the cache holds a real token, 0 for padding
        self.positions: torch.Tensor | None = None  # (B,) position id of each row's next token
        self.decode_steps = self.sequence_steps = 0
        # The keys and values of the last system-message prefix prefilled (see `_reuse_prefix`); its tokens saved.
        self.prefix_cache: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.prefix_tokens_reused = 0
        self.user_id = engine.tokenizer.convert_tokens_to_ids(USER) if USER in engine.tokenizer.get_vocab() else None

    @property
    def active(self) -> int:
        return len(self.sequences)

    @property
    def room(self) -> int:
        return self.max_batch_size - len(self.sequences)

    def can_join(self, group_size: int, group_tokens: int, num_tokens: int) -> bool:
        """May a prompt of ``num_tokens`` join a prefill group of ``group_size`` prompts and ``group_tokens`` tokens?
        A prompt over the token budget is prefilled alone rather than never."""
        if group_size >= self.room:
            return False
        return group_size == 0 or group_tokens + num_tokens <= self.max_batch_tokens

    @property
    def batching_factor(self) -> float | None:
        """Mean answers advanced per decode step so far (None before the first step)."""
        return self.sequence_steps / self.decode_steps if self.decode_steps else None

    # --------------------------------------------------------------------------------------------- join
    @torch.no_grad()
    def join(self, requests: list[BatchRequest]) -> None:
        """Prefill ``requests`` together and add them to the batch (each gets its first token now).

        Raises (nothing joined, the running batch untouched) when their prompts cannot be encoded.
        """
        if len(requests) > self.room:
            raise ValueError(f"{len(requests)} requests do not fit: {self.active} of {self.max_batch_size} "
                             "answers are running")
        device = self.engine.pipeline.device
        prompts = [r.call.prompt for r in requests]
        batch = self.engine.pipeline.encode([p.text for p in prompts], [im for p in prompts for im in p.images],
                                            [fr for p in prompts for fr in p.frames])
        features = self.model.encode_image(batch["images"]) if batch["images"] is not None else None
        frame_features = (self.model.encode_image(batch["frames"], self.model.config.v_query)
                          if batch["frames"] is not None else None)
        prefix = self._shared_prefix(batch["input_ids"], batch["attention_mask"])
        cache, ids, mask = self._reuse_prefix(prefix, batch["input_ids"], batch["attention_mask"])
        embeds = self.model.embed(ids, features, frame_features)
        # As transformers generate: positions count real tokens; padding gets a harmless 1.
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, mask.shape[1] - ids.shape[1]:]
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                     cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        if prefix is not None and prefix not in self.prefix_cache:  # keep its keys and values for the next joins
            start = int((mask[0] == 0).sum())  # row 0's padding, then its prefix
            self.prefix_cache.clear()  # one system message at a time: the common case, and bounded memory
            self.prefix_cache[prefix] = [(k[:1, :, start:start + len(prefix)].clone(),
                                          v[:1, :, start:start + len(prefix)].clone()) for k, v, *_ in cache]
        new = [_Sequence(r, self.engine, device) for r in requests]
        self._stack(cache, mask, mask.long().sum(-1), new)
        self._advance(range(self.active - len(new), self.active), logits.float())

    def _reuse_prefix(self, prefix: tuple[int, ...] | None, ids: torch.Tensor, mask: torch.Tensor):
        """``(cache, ids, mask)`` to prefill. When every prompt of the group starts with ``prefix`` (the system
        message, see `_shared_prefix`) and its keys and values are in `prefix_cache` (kept from an earlier join),
        only the rest of each prompt is prefilled: ``ids (B, L - P)`` are the prompts without it, still
        left-padded, and ``mask (B, L)`` holds the prefix's P columns first, so the padding sits between prefix
        and rest, which the attention mask and the positions account for. Otherwise an empty cache and the inputs
        unchanged. The causal mask makes the prefix's keys and values the same in every prompt it starts."""
        layers = self.prefix_cache.get(prefix) if prefix is not None else None
        if layers is None:
            return DynamicCache(config=self.language_model.config), ids, mask
        P, B = len(prefix), ids.shape[0]
        self.prefix_tokens_reused += P * B
        starts = (mask == 0).long().sum(-1).tolist()  # each row's padding, then its prefix
        rest = torch.stack([torch.cat([torch.arange(n), torch.arange(n + P, ids.shape[1])]) for n in starts])
        rest = rest.to(ids.device)
        cache = DynamicCache([(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in layers],
                             config=self.language_model.config)
        return cache, ids.gather(1, rest), torch.cat([mask.new_ones(B, P), mask.gather(1, rest)], dim=1)

    def _shared_prefix(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...] | None:
        """The token ids before and including the first ``[USER]`` when every row has the same ones and some
        tokens follow them; None otherwise (base models, different system messages)."""
        if self.user_id is None:
            return None
        prefix = None
        for row, real in zip(ids.tolist(), mask.bool().tolist()):
            tokens = [t for t, r in zip(row, real) if r]
            if self.user_id not in tokens:
                return None
            end = tokens.index(self.user_id) + 1
            if prefix is None:
                prefix = tuple(tokens[:end])
            if tuple(tokens[:end]) != prefix or end >= len(tokens):
                return None
        return prefix

    def _stack(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor, new: list[_Sequence]):
        """Append rows to the running batch, left-padding the shorter cache so that every row ends at the step."""
        if self.cache is None:
            self.cache, self.mask, self.positions, self.sequences = cache, mask, positions, new
            return
        length = max(self.mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, n: int) -> torch.Tensor:  # left-pad the sequence dimension (-2 for keys/values)
            return F.pad(t, (0, 0, n, 0)) if t.dim() == 4 else F.pad(t, (n, 0))

        grow_old, grow_new = length - self.mask.shape[1], length - mask.shape[1]
        layers = [(torch.cat([pad(k0, grow_old), pad(k1, grow_new)]), torch.cat([pad(v0, grow_old), pad(v1, grow_new)]))
                  for (k0, v0, *_), (k1, v1, *_) in zip(self.cache, cache)]
        self.cache = DynamicCache(layers, config=self.language_model.config)
        self.mask = torch.cat([pad(self.mask, grow_old), pad(mask, grow_new)])
        self.positions = torch.cat([self.positions, positions])
        self.sequences = self.sequences + new

    # --------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> None:
        """One decode step: every active answer gets its next token; those that end leave the batch."""
        if not self.sequences:
            return
        tokens = torch.tensor([[s.tokens[-1]] for s in self.sequences], device=self.mask.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.active, 1)], dim=1)
        logits = self.language_model(input_ids=tokens, attention_mask=self.mask, position_ids=self.positions[:, None],
                                     cache=self.cache, use_cache=True).logits[:, -1]
        self.positions = self.positions + 1
        self.decode_steps += 1
        self.sequence_steps += self.active
        self._advance(range(self.active), logits.float())

    def drop_interrupted(self) -> None:
        """End the answers cancelled or past their deadline since the last step (what they have is their answer)."""
        self._end([i for i, s in enumerate(self.sequences) if s.interrupted()])

    def fail_all(self, error: BaseException) -> None:
        """Every running answer fails with ``error`` (the batch's forward raised); the batch is emptied."""
        sequences, self.sequences, self.cache, self.mask, self.positions = self.sequences, [], None, None, None
        for s in sequences:
            s.request.finish(None, error)

    def _advance(self, rows, logits: torch.Tensor) -> None:
        rows = list(rows)
        greedy = logits.argmax(-1).tolist()
        ended = []
        for i, row in enumerate(rows):
            s = self.sequences[row]
            try:
                token = s.pick(logits[i]) if s.warpers is not None else greedy[i]
                if s.add(token, self.eos):
                    ended.append(row)
            except Exception as error:  # noqa: BLE001 - e.g. its stream callback failed: this answer alone fails
                s.error = error
                ended.append(row)
        self._end(ended)

    def _end(self, rows: list[int]) -> None:
        if not rows:
            return
        ending, leaving = [self.sequences[i] for i in rows], set(rows)
        keep = [i for i in range(self.active) if i not in leaving]
        self._keep(keep)
        for s in ending:
            result, error = None, s.error
            if error is None:
                try:
                    result = s.result()
                except Exception as exc:  # noqa: BLE001 - decoding this answer's text failed; it alone fails
                    error = exc
            s.request.finish(result, error)

    def _keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` of the batch, dropping the padding columns no remaining row needs."""
        if not rows:
            self.sequences, self.cache, self.mask, self.positions = [], None, None, None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        start = int(mask.any(0).long().argmax())  # first column some remaining row attends to
        layers = [(k[index, :, start:], v[index, :, start:]) for k, v, *_ in self.cache]
        self.cache = DynamicCache(layers, config=self.language_model.config)
        self.mask, self.positions = mask[:, start:], self.positions[index]
        self.sequences = [self.sequences[i] for i in rows]


# ----------------------------------------------------------------------------------------------- worker
_EMPTY = object()


class BatchingWorker(ModelWorker):
    """`ModelWorker` whose thread decodes the waiting chat requests together with a `BatchDecoder`.

    Between decode steps it takes waiting jobs in order: a batchable `ChatCall` for this engine joins (while the
    batch has room and the prefill stays within the token budget; the next one waits for the next step), any
    other job (images, beam search, n > 1) runs alone, to its end, while the batch waits.
    """

    def __init__(self, max_pending: int, timeout: float, engine: ChatEngine, max_batch_size: int = 16,
                 max_batch_tokens: int = 8192):
        super().__init__(max_pending, timeout)
        self.decoder = BatchDecoder(engine, max_batch_size, max_batch_tokens)
        self._held: Job | None = None

    def _next(self, block: bool):
        if self._held is not None:
            job, self._held = self._held, None
            return job
        try:
            return self._queue.get(block=block)
        except queue.Empty:
            return _EMPTY

    def _work(self) -> None:
        decoder = self.decoder
        while not self._closed.is_set():
            joining, tokens = [], 0
            while len(joining) < decoder.room:
                job = self._next(block=not (decoder.active or joining))
                if job is _EMPTY:
                    break
                if job is None:
                    return
                if job.cancel.is_set() or job.remaining() <= 0:
                    continue  # nobody is waiting for it any more
                call = job.fn
                if not (isinstance(call, ChatCall) and call.batchable and call.engine is decoder.engine):
                    self.busy = True
                    self._run_job(job)
                    self.busy = bool(decoder.active)  # idle again unless a batch waits (the next get may block)
                    continue
                if not decoder.can_join(len(joining), tokens, call.prompt.num_tokens):
                    self._held = job
                    break
                joining.append(job)
                tokens += call.prompt.num_tokens
            self.busy = True
            if joining:
                self._join(joining)
            decoder.drop_interrupted()
            if decoder.active:
                try:
                    decoder.step()
                except Exception as error:
                    logger.exception("batched decode step failed")
                    decoder.fail_all(error)
            self.busy = bool(decoder.active)

    def _join(self, jobs: list[Job]) -> None:
        # No deadline of their own: the server sets ``cancel`` when it answers 504, as for serial jobs; ending an
        # answer at the deadline here could settle it with a partial 200 just before the 504.
        requests = [BatchRequest(job.fn, _finisher(job), job.cancel) for job in jobs]
        try:
            self.decoder.join(requests)
        except Exception as error:
            logger.exception("batched prefill failed")
            for request in requests:
                request.finish(None, error)


def _finisher(job: Job) -> Callable[[Any, BaseException | None], None]:
    def finish(result: Any, error: BaseException | None) -> None:
        job.fn.done(result, error)
        settle_job(job, result, error)

    return finish


def make_worker(limits, engine: ChatEngine | None) -> ModelWorker:
    """The server's model worker: batching chat answers when ``limits.max_batch_size`` > 1 and a chat model is
    served, else the serial `ModelWorker`."""
    if engine is None or limits.max_batch_size <= 1:
        return ModelWorker(limits.max_queue, limits.timeout)
    return BatchingWorker(limits.max_queue, limits.timeout, engine, limits.max_batch_size, limits.max_batch_tokens)
