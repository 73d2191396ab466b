"""Interleaved generation: text tokens and images from one model in one decoding loop over one KV cache.

The paper's model predicts the next element of an interleaved sequence (paper 2.2.2): a text token through
``lm_head``, or a visual embedding through ``project_down``. This loop follows whichever the sequence asks for:

- text: choose the next token from the logits (greedy or sampled, through transformers' logits processors);
- when the chosen token is ``[IMG]`` (or the caller forces an image at that point): regress ``n_query`` visual
  embeddings one per step, each fed back through ``project_up`` as the next input (the official
  `generate_image` feeds its regressed embeddings back the same way, re-running the whole sequence per
  embedding; one cache and one single-position step per element is equal in exact arithmetic);
- after the last embedding: feed ``[/IMG]`` and continue with text, until ``</s>``, a stop criterion, or the
  limits (``max_new_tokens`` text tokens, ``max_images`` images).

Batches: the prompts are left-padded and prefilled together; afterwards every row advances exactly one
position per step whatever it is doing (a text token, a visual embedding, ``[/IMG]``, or padding once
finished), so all rows share one `DynamicCache` and one growing attention mask, and each row keeps its own
state (text or image, embeddings done, images and tokens so far). A row equals its own unbatched run.

Shapes: B batch, L prompt length, T generated positions, Q n_query, D LM hidden, Dv vision width, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

_TEXT, _IMAGE, _CLOSE, _DONE = "text", "image", "close", "done"


@dataclass
class InterleavedSequence:
    """What one row generated.

    parts: in order, text segments as lists of token ids (without ``[IMG]``/``</s>``) and images as their
        regressed embeddings ``(Q, Dv)``.
    token_ids: every generated position as a token id, each image as ``[IMG]`` + ``<image>`` x Q + ``[/IMG]``
        (``[IMG]`` is left out when the prompt itself ended with it), the final ``</s>`` included: the prompt
        ids + these, with the images spliced into the ``<image>`` slots, are the whole sequence.
    finish_reason: "eos" (``</s>``), "stop" (a stopping criterion, e.g. a stop string) or "length"
        (``max_new_tokens`` text tokens).
    logits: ``(K, V)`` raw logits of each of the K tokens the LM head chose (text, ``[IMG]``, ``</s>``), in
        order; only with ``output_logits``.
    """

    parts: list[list[int] | torch.Tensor] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logits: torch.Tensor | None = None

    @property
    def images(self) -> list[torch.Tensor]:
        """The regressed embeddings of each image, ``(Q, Dv)`` each."""
        return [p for p in self.parts if isinstance(p, torch.Tensor)]


@dataclass
class InterleavedImage:
    """An image part of an interleaved answer: its regressed embeddings ``(Q, Dv)`` and, when a visual decoder
    was given, the decoded picture (a PIL image)."""

    embeddings: torch.Tensor = field(repr=False)
    image: object | None = None


@dataclass
class InterleavedEvent:
    """One streamed element of row ``row``: a text token id (``token``) or a finished image (``image (Q, Dv)``)."""

    row: int
    token: int | None = None
    image: torch.Tensor | None = None


@dataclass
class _Row:
    mode: str
    forced: set[int]
    out: InterleavedSequence
    slot: int = 0  # visual embeddings regressed so far in the current image
    n_text: int = 0
    n_images: int = 0
    image: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)

    def add_text(self, token: int) -> None:
        if not self.out.parts or isinstance(self.out.parts[-1], torch.Tensor):
            self.out.parts.append([])
        self.out.parts[-1].append(token)
        self.n_text += 1


def _processors(do_sample, temperature, top_k, top_p, logits_processor) -> LogitsProcessorList:
    processors = LogitsProcessorList(logits_processor or [])
    if do_sample:
        if temperature is not None and temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


def _per_row(force_image_at, batch_size: int) -> list[set[int]]:
    """``force_image_at``: ints for every row, or one collection of ints per row."""
    items = list(force_image_at or ())
    if items and all(isinstance(x, Collection) for x in items):
        if len(items) != batch_size:
            raise ValueError(f"force_image_at has {len(items)} per-row entries for a batch of {batch_size}")
        return [set(int(n) for n in x) for x in items]
    return [set(int(n) for n in items) for _ in range(batch_size)]


@torch.inference_mode()
def iter_interleaved(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    images: torch.Tensor | None = None,
    frames: torch.Tensor | None = None,
    image_features: torch.Tensor | None = None,
    frame_features: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 256,
    max_images: int = 4,
    do_sample: bool = False,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    logits_processor: Sequence | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    force_image_at: Collection = (),
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    output_logits: bool = False,
) -> Iterator[InterleavedEvent]:
    """Generate interleaved text and images, yielding each text token and each finished image as it comes.

    The generator's return value (``StopIteration.value``; `generate_interleaved` returns it) is one
    `InterleavedSequence` per row.

    Args:
        model: an `Emu2ForCausalLM`.
        input_ids, attention_mask: ``(B, L)`` left-padded prompts, image blocks expanded; a prompt whose last
            token is ``[IMG]`` starts with an image.
        images, frames: ``(N, 3, S, S)`` / ``(M, 3, S, S)`` pixels of the prompt's visuals, or their encoded
            ``image_features (N, Q, Dv)`` / ``frame_features (M, Qv, Dv)``.
        max_new_tokens: text tokens per row (image positions do not count; ``max_images`` bounds them).
        max_images: images per row; once reached, ``[IMG]`` can no longer be chosen.
        do_sample, temperature, top_k, top_p: as transformers ``generate`` (greedy by default).
        logits_processor: extra transformers logits processors, applied before the sampling warpers; they see
            ``(B, L + T)`` ids (prompt and generated positions) and ``(B, V)`` scores.
        stopping_criteria: transformers criteria (e.g. ``StopStringCriteria``), called with the generated ids
            ``(B, T)`` after each text token; a row they flag ends with finish_reason "stop".
        force_image_at: start an image once a row has generated this many text tokens (0: right after the
            prompt); ints for every row, or one collection per row.
        eos_token_id: ends a row (default: the LM config's).
        generator: the random generator for sampling (on the model's device, as torch.multinomial needs).
        output_logits: keep the raw logits of every token chosen by the LM head (``InterleavedSequence.logits``).
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    state = _Rows(model, input_ids, max_new_tokens=max_new_tokens, max_images=max_images,
                  processors=_processors(do_sample, temperature, top_k, top_p, logits_processor),
                  criteria=StoppingCriteriaList(stopping_criteria or []), force_image_at=force_image_at,
                  eos_token_id=eos_token_id, do_sample=do_sample, generator=generator, output_logits=output_logits)
    decoder = model.language_model.get_decoder()
    image_features, frame_features = model._visual_features(images, frames, image_features, frame_features)
    step_input = model.embed(input_ids, image_features, frame_features)  # (B, L, D)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    mask, cache = attention_mask, DynamicCache(config=model.config.text_config)
    while True:
        hidden = decoder(inputs_embeds=step_input, attention_mask=mask, position_ids=positions,
                         cache=cache, use_cache=True).last_hidden_state[:, -1]  # (B, D)
        next_embeds, events = state.step(hidden)
        yield from events
        if state.done:
            return state.results()
        step_input = next_embeds[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)


class _Rows:
    """Every row's state in one `iter_interleaved` call, and what each step feeds next.

    `step(hidden)` takes the LM's last hidden state ``(B, D)`` of the step just run: it chooses the text rows'
    tokens, takes the image rows' regressed embeddings, and returns the next position's input embeddings
    ``(B, D)`` with the events (text tokens, finished images) that step produced.
    """

    def __init__(self, model, input_ids: torch.Tensor, *, max_new_tokens: int, max_images: int,
                 processors: LogitsProcessorList, criteria: StoppingCriteriaList, force_image_at: Collection,
                 eos_token_id: int | None, do_sample: bool, generator: torch.Generator | None,
                 output_logits: bool):
        cfg = self.cfg = model.config
        B, L = input_ids.shape
        Q = cfg.n_query
        if max_new_tokens < 0 or max_images < 0:
            raise ValueError(f"max_new_tokens and max_images must be >= 0; got {max_new_tokens} and {max_images}")
        limit = getattr(cfg.text_config, "max_position_embeddings", None)
        longest = L + max_new_tokens + 1 + max_images * (Q + 2)
        if limit is not None and longest > limit:
            raise ValueError(f"prompt ({L}) + max_new_tokens ({max_new_tokens}) + max_images ({max_images}) x "
                             f"{Q + 2} image positions = {longest} exceeds the model's {limit} positions; "
                             "lower max_new_tokens or max_images, or shorten the prompt")
        self.model, self.max_new_tokens, self.max_images = model, max_new_tokens, max_images
        self.processors, self.criteria, self.do_sample, self.generator = processors, criteria, do_sample, generator
        self.output_logits = output_logits
        self.eos = cfg.text_config.eos_token_id if eos_token_id is None else eos_token_id
        self.pad = cfg.text_config.pad_token_id if cfg.text_config.pad_token_id is not None else self.eos
        # Placeholder ids are slots for visuals, never text; [IMG] is only allowed while images remain.
        self.never = [cfg.image_token_id, cfg.frame_token_id]
        self.embed_tokens = model.get_input_embeddings()
        self.lm_head = model.language_model.get_output_embeddings()
        forced = _per_row(force_image_at, B)
        self.rows = [_Row(_TEXT, forced[b], InterleavedSequence()) for b in range(B)]
        for b, row in enumerate(self.rows):  # a prompt ending with [IMG] asks for an image first
            if int(input_ids[b, -1]) == cfg.boi_token_id and max_images > 0:
                row.mode, row.n_images = _IMAGE, 1
        self.all_ids = input_ids  # (B, L + T): what the logits processors see
        self.generated = input_ids.new_zeros(B, 0)  # (B, T): what the stopping criteria see

    @property
    def done(self) -> bool:
        return all(r.mode == _DONE for r in self.rows)

    def step(self, hidden: torch.Tensor) -> tuple[torch.Tensor, list[InterleavedEvent]]:
        image_rows = [b for b, r in enumerate(self.rows) if r.mode == _IMAGE]
        chosen = self._choose_text(hidden)
        regressed = self.model.project_down(hidden[image_rows]) if image_rows else None  # (len, Dv)
        next_ids, next_embeds, events = self._next_elements(image_rows, regressed, chosen)
        live = [b for b, r in enumerate(self.rows) if r.mode != _DONE or b in chosen]
        for b in live:
            self.rows[b].out.token_ids.append(int(next_ids[b]))
        self.generated = torch.cat([self.generated, next_ids[:, None]], dim=1)
        self.all_ids = torch.cat([self.all_ids, next_ids[:, None]], dim=1)
        texted = [e.row for e in events if e.token is not None]
        if texted and len(self.criteria):
            stop = self.criteria(self.generated, None)
            for b in texted:
                if bool(stop[b]):
                    self.rows[b].mode, self.rows[b].out.finish_reason = _DONE, "stop"
        return next_embeds, events

    def _choose_text(self, hidden: torch.Tensor) -> dict[int, int]:
        """The next token of each text row (``[IMG]`` where an image is forced); rows out of tokens end."""
        rows, cfg = self.rows, self.cfg
        text_rows = [b for b, r in enumerate(rows) if r.mode == _TEXT]
        if not text_rows:
            return {}
        raw = self.lm_head(hidden).float()  # (B, V)
        scores = raw.clone()
        scores[:, self.never] = float("-inf")
        for b in text_rows:
            if rows[b].n_images >= self.max_images:
                scores[b, cfg.boi_token_id] = float("-inf")
        scores = self.processors(self.all_ids, scores)
        if self.do_sample:
            picks = torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(1)
        else:
            picks = scores.argmax(-1)
        chosen = {}
        for b in text_rows:
            row = rows[b]
            if row.n_text in row.forced and row.n_images < self.max_images:
                chosen[b] = cfg.boi_token_id
            elif row.n_text >= self.max_new_tokens:
                row.mode, row.out.finish_reason = _DONE, "length"
                continue
            else:
                chosen[b] = int(picks[b])
            if self.output_logits:
                row.logits.append(raw[b].cpu())
        return chosen

    def _next_elements(self, image_rows: list[int], regressed: torch.Tensor | None, chosen: dict[int, int]):
        """Each row's element at the next position: its id ``(B,)`` in the record, its input embedding
        ``(B, D)``, and the events: an image row's embedding (an image ends after Q), ``[/IMG]`` after an
        image, a text row's chosen token."""
        cfg, rows, Q = self.cfg, self.rows, self.cfg.n_query
        next_ids = torch.full((len(rows),), self.pad, dtype=self.all_ids.dtype, device=self.all_ids.device)
        next_embeds = self.embed_tokens(next_ids).clone()  # overwritten below for image slots
        events = []
        for i, b in enumerate(image_rows):
            row = rows[b]
            row.image.append(regressed[i])
            row.slot += 1
            next_ids[b] = cfg.image_token_id
            next_embeds[b] = self.model.project_up(regressed[i]).to(next_embeds.dtype)
            if row.slot == Q:  # the last slot's input goes in next; its output would be [/IMG], which is fed
                image = torch.stack(row.image)
                row.out.parts.append(image)
                events.append(InterleavedEvent(b, image=image))
                row.mode, row.slot, row.image = _CLOSE, 0, []
        for b, row in enumerate(rows):
            if row.mode == _CLOSE and b not in image_rows:
                next_ids[b] = cfg.eoi_token_id
                next_embeds[b] = self.embed_tokens(next_ids[b])
                row.mode = _TEXT
        for b, token in chosen.items():
            row = rows[b]
            next_ids[b] = token
            next_embeds[b] = self.embed_tokens(next_ids[b])
            if token == cfg.boi_token_id:
                row.mode, row.n_images = _IMAGE, row.n_images + 1
                row.forced.discard(row.n_text)
            elif token == self.eos:
                row.mode, row.out.finish_reason = _DONE, "eos"
            else:
                row.add_text(token)
                events.append(InterleavedEvent(b, token=token))
                if row.n_text >= self.max_new_tokens and row.n_text not in row.forced:
                    row.mode, row.out.finish_reason = _DONE, "length"  # no step for a token never chosen
        return next_ids, next_embeds, events

    def results(self) -> list[InterleavedSequence]:
        for row in self.rows:
            if self.output_logits:
                row.out.logits = (torch.stack(row.logits) if row.logits
                                  else torch.zeros(0, self.lm_head.out_features))
        return [row.out for row in self.rows]


def generate_interleaved(model, input_ids: torch.Tensor, *args,
                         callback: Callable[[InterleavedEvent], None] | None = None,
                         **kwargs) -> list[InterleavedSequence]:
    """`iter_interleaved` run to the end: one `InterleavedSequence` per row; ``callback`` gets each event."""
    events = iter_interleaved(model, input_ids, *args, **kwargs)
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            return done.value
        if callback is not None:
            callback(event)
