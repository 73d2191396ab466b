"""The OpenAI-compatible HTTP server: FastAPI routes over `ChatEngine`, `ImageGenerator` and one `ModelWorker`.

    app = create_app(Emu2Pipeline.from_pretrained("emu2-chat"), gen_pipeline=None, ui=True)
    uvicorn.run(app, host="127.0.0.1", port=8000)        # what `emu2 serve` does

Routes: ``POST /v1/chat/completions`` (streaming as server-sent events), ``POST /v1/images/generations``,
``POST /v1/images/edits`` (multipart as OpenAI, or JSON with data URLs; both stream their progress as server-sent
events with ``stream: true``, see `Emu2Server.stream_images`), ``GET /v1/models``, ``GET /healthz``,
``GET /openapi.json`` (FastAPI's schema; ``/docs`` and ``/redoc`` are off, since their pages load scripts from a
CDN), and the web page at ``/`` with ``ui=True``.

A request goes: validate (pydantic; then on the event loop the model name, unsupported fields, content part types
and a text-length bound on the prompt; then `ServeLimits`, images decoded and prompts tokenized on a thread-pool
thread) -> queue for the model thread (429 when full) -> answer (504 past the deadline). Every error is OpenAI's
``{"error": {"message", "type", "param", "code"}}``; an exception inside the model is a 500 for that request
only, the worker thread carries on with the next.
"""

from __future__ import annotations

import asyncio
import json
import logging
import reprlib
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Self

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import processing as P
from .batching import ChatCall, make_worker
from .chat import Answer, ChatEngine, ChatPrompt, DecodingSettings, reserved_token_in
from .generation import GroundedObject, ImageGenerator, build_generation_inputs, png_base64
from .interleaved_chat import ImageAnswerSettings, InterleavedChat, wants_images
from .limits import ServeLimits, decode_image_bytes, load_image_url, load_video_frame_urls, load_video_url
from .queue import ClientDisconnected, Job
from .schemas import (
    IGNORED_MESSAGE_FIELDS,
    SUPPORTED_PART_TYPES,
    UNSUPPORTED_CHAT_FIELDS,
    UNSUPPORTED_IMAGE_FIELDS,
    UNSUPPORTED_MESSAGE_FIELDS,
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    ModelList,
    OtherPart,
    refused_field,
)

logger = logging.getLogger("emu2.serve")
STATIC_DIR = Path(__file__).parent / "static"
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_LENGTH = 64  # transformers' stop-string matcher precomputes a table per vocabulary token and character
_ERRORS = {status: {"model": ErrorResponse} for status in (400, 403, 404, 413, 429, 500, 504)}
# The page loads only its own files; images shown are data: URLs made in the page.
_CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'"


class Emu2Server:
    """The state behind the routes: models, limits, the worker, the directory file URLs may read."""

    def __init__(self, chat_pipeline=None, gen_pipeline=None, limits: ServeLimits | None = None,
                 allowed_dir: str | Path | None = None, chat_model_name: str = "emu2-chat",
                 gen_model_name: str = "emu2-gen", decoder=None):
        if chat_pipeline is None and gen_pipeline is None:
            raise ValueError("the server needs a chat model, an image model, or both")
        self.chat = ChatEngine(chat_pipeline) if chat_pipeline is not None else None
        self.gen = ImageGenerator(gen_pipeline) if gen_pipeline is not None else None
        # Images in chat answers: the chat model writes, a visual decoder draws (--decoder, else Emu2-Gen's).
        decoder = decoder if decoder is not None else (self.gen.decoder if self.gen is not None else None)
        self.interleaved = (InterleavedChat(chat_pipeline, decoder)
                            if chat_pipeline is not None and decoder is not None else None)
        self.limits = limits or ServeLimits()
        self.allowed_dir = Path(allowed_dir).resolve() if allowed_dir is not None else None
        self.chat_model_name, self.gen_model_name = chat_model_name, gen_model_name
        self.worker = make_worker(self.limits, self.chat)
        self.started = int(time.time())

    # ------------------------------------------------------------------------------------------ models
    async def run_model(self, fn, disconnected: Callable[[], Awaitable[bool]] | None = None) -> Any:
        """``fn(cancel)`` on the model worker; ``disconnected``: the request's ``is_disconnected``, so that a
        non-streamed answer whose client has left stops being computed (`ModelWorker.run`)."""
        try:
            return await self.worker.run(fn, disconnected)
        except ClientDisconnected:
            raise APIError(499, "the client closed the connection before the answer was ready; it was cancelled",
                           None, "client_disconnected") from None
        except (APIError, asyncio.CancelledError):
            raise
        except P.PromptError as error:
            raise APIError(400, str(error), None, "invalid_prompt") from None
        except Exception as error:  # noqa: BLE001 - the worker logged the traceback; this request alone fails
            raise APIError(500, f"the model failed on this request ({type(error).__name__}: {error}); "
                                "the server is still running", None, "model_error") from None

    # ------------------------------------------------------------------------------- checks on the loop
    # These run on the event loop before any thread-pool or model work: each is cheap (no tokenizing, no image
    # decoding), so a request refused here costs the server next to nothing, however large it is.
    def screen_chat(self, request: ChatCompletionRequest) -> bool:
        """Refuse a chat request for another model, unsupported fields or part types, or surely too long text;
        -> whether it asks for images in the answer."""
        if self.chat is None:
            raise APIError(404, "this server has no chat model: start it with --model DIR", "model",
                           "model_not_found")
        self._check_model(request.model, self.chat_model_name, "chat",
                          (self.gen_model_name, "/v1/images/generations") if self.gen else None)
        _refuse_fields(request, UNSUPPORTED_CHAT_FIELDS)
        chars = 0
        for i, message in enumerate(request.messages):
            _refuse_fields(message, UNSUPPORTED_MESSAGE_FIELDS, IGNORED_MESSAGE_FIELDS, f"messages[{i}].")
            parts = message.content if isinstance(message.content, list) else [message.content or ""]
            for j, part in enumerate(parts):
                if isinstance(part, str):
                    chars += len(part)
                elif isinstance(part, OtherPart):
                    raise APIError(400, f"messages[{i}].content[{j}]: content part type {_shown(part.type)} is not "
                                        f"supported (supported: {', '.join(SUPPORTED_PART_TYPES)})",
                                   f"messages[{i}].content[{j}].type", "unsupported_content_part")
                elif part.type == "text":
                    chars += len(part.text)
        self._check_text_length(chars, self.chat.prompt_tokenizer, "messages")
        return wants_images(request, self.interleaved is not None)

    def screen_images(self, request: ImageGenerationRequest) -> None:
        """Refuse an image request for another model, with unsupported fields, or with surely too long text."""
        if self.gen is None:
            raise APIError(404, "this server has no image model: start it with --gen-model DIR", "model",
                           "model_not_found")
        self._check_model(request.model, self.gen_model_name, "image",
                          (self.chat_model_name, "/v1/chat/completions") if self.chat else None)
        _refuse_fields(request, UNSUPPORTED_IMAGE_FIELDS)
        chars = len(request.prompt) + sum(len(o.phrase) for o in request.objects)
        self._check_text_length(chars, self.gen.prompt_tokenizer, "prompt")

    @staticmethod
    def _check_model(requested: str | None, served: str, kind: str, other: tuple[str, str] | None) -> None:
        # Absent means this endpoint's model; any name but the one /v1/models lists is refused as OpenAI does
        # (404 model_not_found), so a client asking for gpt-4o is not answered by Emu2 in its place.
        if requested is None or requested == served:
            return
        if other is not None and requested == other[0]:
            message = f"the model {_shown(requested)} is this server's other model: send it to {other[1]}"
        else:
            message = f"the model {_shown(requested)} does not exist on this server"
        raise APIError(404, f"{message}; its {kind} model is {served!r} (GET /v1/models lists the models; "
                            "omit model to use it)", "model", "model_not_found", kind="invalid_request_error")

    def _check_text_length(self, chars: int, tokenizer, param: str) -> None:
        limit = tokenizer.max_text_chars(self.limits.max_prompt_tokens)
        if chars > limit:
            raise APIError(400, f"the prompt holds {chars} characters of text, more than {limit}: no token of "
                                f"this model covers more than {tokenizer.max_token_chars} characters, so it is "
                                f"surely over {self.limits.max_prompt_tokens} tokens (server limit "
                                "--max-prompt-tokens)", param, "context_length_exceeded")

    # -------------------------------------------------------------------------------------------- chat
    def prepare_chat(self, request: ChatCompletionRequest) -> tuple[ChatPrompt, DecodingSettings]:
        """Validate a chat request against the limits and write its prompt (decodes images: run off the loop)."""
        settings, lim = self._decoding_settings(request), self.limits
        images_wanted = sum(isinstance(m.content, list) and sum(p.type == "image_url" for p in m.content)
                            for m in request.messages)
        if images_wanted > lim.max_images:
            raise APIError(400, f"the messages hold {images_wanted} images, more than {lim.max_images} "
                                "(server limit --max-images)", "messages", "too_many_images")
        videos_wanted = sum(isinstance(m.content, list) and sum(p.type in ("video_url", "video") for p in m.content)
                            for m in request.messages)
        if videos_wanted > lim.max_videos:
            raise APIError(400, f"the messages hold {videos_wanted} videos, more than {lim.max_videos} "
                                "(server limit --max-videos)", "messages", "too_many_videos")
        system, turns = self._conversation(request)
        try:
            prompt = self.chat.build_prompt(turns, system=system, grounding=bool(request.grounding))
        except P.PromptError as error:
            raise APIError(400, str(error), "messages", "invalid_prompt") from None
        if prompt.num_tokens > lim.max_prompt_tokens:
            raise APIError(400, f"the prompt is {prompt.num_tokens} tokens (each image counts its visual slots), "
                                f"more than {lim.max_prompt_tokens} (server limit --max-prompt-tokens)",
                           "messages", "context_length_exceeded")
        return prompt, settings

    def _decoding_settings(self, request: ChatCompletionRequest) -> DecodingSettings:
        """The request's decoding parameters, checked against the limits and against each other."""
        lim = self.limits
        max_tokens = (request.max_tokens or request.max_completion_tokens
                      or min(lim.default_max_tokens, lim.max_tokens))
        if max_tokens > lim.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}, above this server's cap of {lim.max_tokens} "
                                "(server limit --max-tokens)", "max_tokens", "max_tokens_too_large")
        n, num_beams = request.n or 1, request.num_beams or 1
        if n > lim.max_n:
            raise APIError(400, f"n is {n}, above this server's cap of {lim.max_n} (server limit --max-n)", "n",
                           "n_too_large")
        if num_beams > lim.max_num_beams:
            raise APIError(400, f"num_beams is {num_beams}, above this server's cap of {lim.max_num_beams} "
                                "(server limit --max-num-beams)", "num_beams", "num_beams_too_large")
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > MAX_STOP_STRINGS or not all(0 < len(s) <= MAX_STOP_LENGTH for s in stop):
            raise APIError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings of at most "
                                f"{MAX_STOP_LENGTH} characters", "stop", "invalid_stop")
        for k, text in enumerate(stop):
            _check_unicode(text, f"stop[{k}]")
        settings = DecodingSettings(max_new_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                                    top_k=request.top_k, num_beams=num_beams, length_penalty=request.length_penalty,
                                    n=n, stop=stop, seed=request.seed)
        if n > 1 and not settings.sampling and num_beams < n:
            raise APIError(400, "n > 1 needs sampling (temperature > 0) or beam search with num_beams >= n; "
                                "deterministic decoding would return n identical answers", "n", "invalid_n")
        if request.stream and (n > 1 or num_beams > 1):
            raise APIError(400, "stream: true needs n = 1 and num_beams = 1 (beam search knows its answer only "
                                "at the end); drop stream for beam search", "stream", "invalid_stream")
        return settings

    def _conversation(self, request: ChatCompletionRequest) -> tuple[str, list[list]]:
        """The system message (the official one unless the request has its own) and the turns, user first and
        last; consecutive messages of one speaker read as one turn."""
        system_parts, turns, roles = [], [], []
        for i, message in enumerate(request.messages):
            items = self._content_items(message.content, f"messages[{i}].content")
            role = "system" if message.role in ("system", "developer") else message.role
            if role == "system":
                if any(not isinstance(item, str) for item in items):
                    raise APIError(400, "system messages take text only", f"messages[{i}].content",
                                   "invalid_content")
                system_parts.append("".join(items))
            elif roles and roles[-1] == role:  # consecutive turns of one speaker read as one turn
                turns[-1] += ["\n", *items]
            else:
                turns.append(items)
                roles.append(role)
        if not roles or roles[0] != "user" or roles[-1] != "user":
            raise APIError(400, "the conversation must start and end with a user message (system messages may "
                                "come first)", "messages", "invalid_conversation")
        return "\n".join(system_parts) if system_parts else P.CHAT_SYSTEM_MESSAGE, turns

    def _content_items(self, content, param: str) -> list:
        if content is None:
            return []
        if isinstance(content, str):
            self._check_text(content, param)
            return [content]
        items = []
        for j, part in enumerate(content):
            if part.type == "text":
                self._check_text(part.text, f"{param}[{j}].text")
                items.append(part.text)
            elif part.type == "image_url":
                items.append(load_image_url(part.image_url.url, self.limits, self.allowed_dir,
                                            f"{param}[{j}].image_url.url"))
            elif part.type == "video_url":  # a list of frames is a video to `processing.flatten_interleaved`
                items.append(load_video_url(part.video_url.url, self.limits, self.allowed_dir,
                                            f"{param}[{j}].video_url.url"))
            else:
                items.append(load_video_frame_urls(part.video, self.limits, self.allowed_dir, f"{param}[{j}].video"))
        return items

    @staticmethod
    def _check_text(text: str, param: str, allowed: tuple[str, ...] = ()) -> None:
        _check_unicode(text, param)
        token = reserved_token_in(text.replace(allowed[0], "") if allowed else text)
        if token is not None:
            raise APIError(400, f"text may not contain the reserved token {token!r}; send images as image parts",
                           param, "reserved_token")

    def chat_response(self, request: ChatCompletionRequest, prompt: ChatPrompt, answers) -> dict:
        completion_tokens = sum(a.num_tokens for a in answers)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
            model=self.chat_model_name,
            choices=[{"index": k, "message": {"role": "assistant",
                                              "content": a.text if isinstance(a, Answer) else a.parts},
                      "finish_reason": a.finish_reason} for k, a in enumerate(answers)],
            usage={"prompt_tokens": prompt.num_tokens, "completion_tokens": completion_tokens,
                   "total_tokens": prompt.num_tokens + completion_tokens},
        ).model_dump()

    def stream_chat(self, request: ChatCompletionRequest, prompt: ChatPrompt, settings: DecodingSettings,
                    drawing: ImageAnswerSettings | None = None) -> StreamingResponse:
        """Queue a streamed answer (429 now if the line is full) and send it as OpenAI chunk events; with
        ``drawing``, an answer with images (chunk shapes: `emu2.serve.interleaved_chat`)."""
        events, push = _event_queue()

        def done(answer, error) -> None:
            push("end", answer) if error is None else push("error", error)

        def draw(cancel):  # answers with images run alone, between the batched decode steps
            try:
                push("end", self.interleaved.answer(prompt, settings, drawing, cancel, push)[0])
            except Exception as error:
                push("error", error)
                raise

        if drawing is None:
            job = self.worker.submit(ChatCall(self.chat, prompt, settings, lambda text: push("text", text), done))
        else:
            self._push_queued(push)
            job = self.worker.submit(draw)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        model = self.chat_model_name
        usage_wanted = bool((request.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish_reason=None, choices=True, usage=None, status=None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
                    if choices else []}
            if usage is not None:
                body["usage"] = usage
            if status is not None:
                body["emu2"] = status
            return _sse(body)

        def send(kind: str, value) -> Iterator[str]:
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "image":
                yield chunk({"content": [value]})
            elif kind == "status":
                yield chunk({}, status=value)
            elif kind == "end":
                yield chunk({}, value.finish_reason)
                if usage_wanted:
                    yield chunk({}, choices=False, usage={
                        "prompt_tokens": prompt.num_tokens, "completion_tokens": value.num_tokens,
                        "total_tokens": prompt.num_tokens + value.num_tokens})

        return self._stream(job, events, send, first=chunk({"role": "assistant", "content": ""}))

    def _push_queued(self, push: Callable[[str, Any], None]) -> None:
        """The first status of a job about to be queued: how many requests the model serves before it. Pushed
        before the job is submitted, so that it comes before the model thread's own statuses."""
        push("status", {"status": "queued", "ahead": self.worker.pending + int(self.worker.busy)})

    def _stream(self, job: Job, events: asyncio.Queue, send: Callable[[str, Any], Iterator[str]],
                first: str = "") -> StreamingResponse:
        """Server-sent events for one queued ``job``: ``first``, then what ``send`` writes for each ``(kind,
        value)`` the model thread queues on ``events`` until ``"end"``, then ``data: [DONE]``. An ``"error"``
        (the model raised) or the deadline passing is sent as OpenAI's error object instead. ``job.cancel`` is
        set when the response ends either way, so a client that leaves (closes the stream, aborts its fetch)
        stops the model at its next token or denoising step and frees the worker for the next request."""
        async def sse():
            try:
                if first:
                    yield first
                while True:
                    try:
                        kind, value = await asyncio.wait_for(events.get(), job.remaining())
                    except TimeoutError:
                        yield _sse(APIError(504, f"the request did not finish within {self.limits.timeout:g} s "
                                                 "(server limit --timeout)", None, "timeout").body())
                        break
                    if kind == "error":
                        yield _sse(APIError(500, f"the model failed on this request ({type(value).__name__}: "
                                                 f"{value}); the server is still running", None,
                                            "model_error").body())
                        break
                    for text in send(kind, value):
                        yield text
                    if kind == "end":
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()  # the client left or the answer ended: stop generating either way

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------------------------------ images
    def prepare_images(self, request: ImageGenerationRequest, uploads: list[bytes] = ()) -> dict:
        """Validate an image request and write the official Emu2-Gen input list (decodes images: off the loop)."""
        lim = self.limits
        if getattr(request, "mask", None):
            raise APIError(400, "masks are not supported: Emu2-Gen edits follow the prompt over the whole image; "
                                "drop mask", "mask", "unsupported_mask")
        n = request.n or 1
        if n > lim.max_n:
            raise APIError(400, f"n is {n}, above this server's cap of {lim.max_n} (server limit --max-n)", "n",
                           "n_too_large")
        steps = lim.inference_steps(request.num_inference_steps)
        try:
            width, height = self.gen.parse_size(request.size, lim.max_output_side)
        except P.PromptError as error:
            raise APIError(400, str(error), "size", "invalid_size") from None
        edited = getattr(request, "image", None) or []
        urls = ([edited] if isinstance(edited, str) else list(edited)) + request.images
        count = len(uploads) + len(urls) + sum(o.image is not None for o in request.objects)
        if count > lim.max_images:
            raise APIError(400, f"the request holds {count} images, more than {lim.max_images} "
                                "(server limit --max-images)", "images", "too_many_images")
        self._check_text(request.prompt, "prompt", allowed=(P.IMAGE_PLACEHOLDER,))
        images = [decode_image_bytes(data, lim, "image") for data in uploads]
        images += [load_image_url(url, lim, self.allowed_dir, f"images[{k}]") for k, url in enumerate(urls)]
        objects = []
        for k, obj in enumerate(request.objects):
            self._check_text(obj.phrase, f"objects[{k}].phrase")
            if any(t in obj.phrase for t in (P.PHRASE, P.PHRASE_END, P.OBJECT, P.OBJECT_END)):
                raise APIError(400, "a phrase may not contain <phrase>/<object> tags", f"objects[{k}].phrase",
                               "reserved_token")
            subject = (load_image_url(obj.image, lim, self.allowed_dir, f"objects[{k}].image")
                       if obj.image is not None else None)
            objects.append(GroundedObject(obj.phrase, tuple(obj.box), subject))
        try:
            inputs = build_generation_inputs(request.prompt, images, objects)
        except P.PromptError as error:
            raise APIError(400, str(error), "prompt", "invalid_prompt") from None
        num_tokens = self.gen.count_tokens(inputs)
        if num_tokens > lim.max_prompt_tokens:
            raise APIError(400, f"the prompt is {num_tokens} tokens (each image counts its visual slots), more "
                                f"than {lim.max_prompt_tokens} (server limit --max-prompt-tokens)", "prompt",
                           "context_length_exceeded")
        return {"inputs": inputs, "n": n, "width": width, "height": height, "num_inference_steps": steps,
                "guidance_scale": 3.0 if request.guidance_scale is None else request.guidance_scale,
                "seed": request.seed}

    async def images(self, request: ImageGenerationRequest, uploads: list[bytes] = (),
                     disconnected: Callable[[], Awaitable[bool]] | None = None):
        self.screen_images(request)
        job = await run_in_threadpool(self.prepare_images, request, uploads)
        key = "url" if request.response_format == "url" else "b64_json"
        size = f"{job['width']}x{job['height']}"

        def image_data(b64: str) -> dict:
            return {key: f"data:image/png;base64,{b64}" if key == "url" else b64}

        if request.stream:
            return self.stream_images(job, image_data, size, edit=isinstance(request, ImageEditRequest))

        def run(cancel):
            return [png_base64(im) for im in self.gen.generate(**job, cancel=cancel)]

        encoded = await self.run_model(run, disconnected)
        return ImagesResponse(created=int(time.time()), data=[image_data(b64) for b64 in encoded], size=size,
                              usage=self.gen.usage(job["inputs"], len(encoded))).model_dump(exclude_none=True)

    def stream_images(self, job: dict, image_data: Callable[[str], dict], size: str,
                      edit: bool = False) -> StreamingResponse:
        """Queue an image request (429 now if the line is full) and stream it as server-sent events: OpenAI's
        ``image_generation.completed`` (``image_edit.completed`` for edits) per image, and before them events of
        type ``emu2.status`` whose ``emu2`` object is the chat stream's status (queued, running, then drawing
        step s of n of image i)."""
        events, push = _event_queue()

        def run(cancel):
            def on_event(kind: str, value) -> None:  # PNGs are encoded here, on the model thread, not the loop
                push(kind, png_base64(value) if kind == "image" else value)

            try:
                self.gen.generate(**job, cancel=cancel, on_event=on_event)
            except Exception as error:
                push("error", error)
                raise
            push("end", None)

        self._push_queued(push)
        model_job = self.worker.submit(run)
        completed = "image_edit.completed" if edit else "image_generation.completed"
        usage = self.gen.usage(job["inputs"], 1)  # each completed event: the prompt and its one image

        def send(kind: str, value) -> Iterator[str]:
            if kind == "status":
                yield _sse({"type": "emu2.status", "emu2": value}, event="emu2.status")
            elif kind == "image":
                yield _sse({"type": completed, **image_data(value), "created_at": int(time.time()), "size": size,
                            "output_format": "png", "background": "opaque", "quality": "auto", "usage": usage},
                           event=completed)

        return self._stream(model_job, events, send)


def _event_queue() -> tuple[asyncio.Queue, Callable[[str, Any], None]]:
    """(events, push): ``push(kind, value)`` from the model thread puts ``(kind, value)`` on ``events`` on the
    event loop's side, in order."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def push(kind: str, value) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (kind, value))

    return events, push


def _sse(body: dict, event: str | None = None) -> str:
    """One server-sent event holding ``body`` as JSON (with its ``event:`` name, as OpenAI's image streams)."""
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(body)}\n\n"


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80


def _shown(value) -> str:
    """A client's value quoted for an error message: shortened, and with lone surrogates escaped (the JSON
    response is encoded as UTF-8, which cannot hold them)."""
    return _SHORT_REPR.repr(value)


def _refuse_fields(model, unsupported: dict, ignored: frozenset | None = None, prefix: str = "") -> None:
    refused = refused_field(model, unsupported, *(() if ignored is None else (ignored,)))
    if refused is not None:
        name, reason = refused
        raise APIError(400, f"{prefix}{reason}", f"{prefix}{name}",
                       "unsupported_parameter" if name in unsupported else "unknown_parameter")


def _check_unicode(text: str, param: str) -> None:
    """JSON may carry lone surrogates ("\\ud800"), which are not text: the tokenizer cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "text is not valid Unicode (it holds a lone surrogate code point)", param,
                       "invalid_text") from None


# --------------------------------------------------------------------------------------------------- app
def create_app(chat_pipeline=None, gen_pipeline=None, limits: ServeLimits | None = None,
               allowed_dir: str | Path | None = None, ui: bool = False, chat_model_name: str = "emu2-chat",
               gen_model_name: str = "emu2-gen", decoder=None) -> FastAPI:
    """The FastAPI app serving an `Emu2Pipeline` (chat) and/or an `Emu2GenPipeline` (images); ``decoder`` (an
    `Emu2VisualDecoderPipeline`, default the Emu2-Gen one) draws the images of chat answers that ask for them.

    Long because it declares every route, each a few lines handing the request to `Emu2Server`, where the work is."""
    server = Emu2Server(chat_pipeline, gen_pipeline, limits, allowed_dir, chat_model_name, gen_model_name, decoder)
    # No /docs or /redoc: their pages load Swagger UI / ReDoc from a CDN and are blank offline (see `docs`).
    app = FastAPI(title="emu2", version="0.1.0", lifespan=_lifespan, docs_url=None, redoc_url=None,
                  description="Emu2 behind the OpenAI API: chat with images, image generation and editing.")
    app.state.server = server
    app.add_middleware(BodySizeLimit, max_bytes=server.limits.max_request_bytes)
    _add_error_handlers(app)

    @app.post("/v1/chat/completions", response_model=None, responses={200: {"model": ChatCompletion}, **_ERRORS})
    async def chat_completions(request: ChatCompletionRequest, http: Request):
        """OpenAI chat completions; ``stream: true`` sends server-sent events ending with ``data: [DONE]``."""
        with_images = server.screen_chat(request)
        prompt, settings = await run_in_threadpool(server.prepare_chat, request)
        drawing = server.interleaved.settings(request, prompt, settings, server.limits) if with_images else None
        if request.stream:
            return server.stream_chat(request, prompt, settings, drawing)
        if drawing is not None:
            answers = await server.run_model(
                lambda cancel: server.interleaved.answer(prompt, settings, drawing, cancel), http.is_disconnected)
            return server.chat_response(request, prompt, answers)
        answers = await server.run_model(ChatCall(server.chat, prompt, settings), http.is_disconnected)
        return server.chat_response(request, prompt, answers)

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS)
    async def images_generations(request: ImageGenerationRequest, http: Request):
        """Generate images from a prompt (optionally with input images and grounded objects)."""
        return await server.images(request, disconnected=http.is_disconnected)

    @app.post("/v1/images/edits", response_model=ImagesResponse, responses=_ERRORS, openapi_extra=_EDIT_BODY)
    async def images_edits(request: Request):
        """Edit images: OpenAI's multipart form (image file(s) + prompt), or JSON with data URLs."""
        body, uploads = await _read_edit_request(request, server.limits)
        try:
            edit = ImageEditRequest.model_validate(body)
        except ValidationError as error:
            raise APIError(400, *_describe_validation(error.errors()), "invalid_request") from None
        if not uploads and not edit.image and not edit.images:
            raise APIError(400, "an edit needs an image: a multipart 'image' file, or 'image' as a data URL",
                           "image", "missing_image")
        return await server.images(edit, uploads, request.is_disconnected)

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        names = [name for name, engine in ((server.chat_model_name, server.chat), (server.gen_model_name,
                                                                                   server.gen)) if engine]
        return {"object": "list", "data": [{"id": n, "created": server.started} for n in names]}

    @app.get("/docs", include_in_schema=False)
    @app.get("/redoc", include_in_schema=False)
    async def docs():
        raise APIError(404, "interactive API docs are not served (their pages load scripts from a CDN); the "
                            "OpenAPI schema is at /openapi.json: open it in any OpenAPI viewer", None,
                       "docs_not_served")

    @app.get("/healthz")
    async def healthz():
        """Liveness: answers while the model computes (the model runs on its own thread). With batched decoding,
        ``decode_steps`` / ``sequence_steps`` count forwards and the answers they advanced since the start, and
        ``prefix_tokens_reused`` the system-message tokens not prefilled again."""
        decoder = getattr(server.worker, "decoder", None)
        batching = {"decode_steps": decoder.decode_steps, "sequence_steps": decoder.sequence_steps,
                    "prefix_tokens_reused": decoder.prefix_tokens_reused} if decoder else None
        return {"status": "ok", "chat_model": server.chat_model_name if server.chat else None,
                "image_model": server.gen_model_name if server.gen else None,
                "chat_images": server.interleaved is not None, "model_busy": server.worker.busy,
                "queued": server.worker.pending, "max_queue": server.limits.max_queue, "batching": batching}

    if ui:
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

        @app.get("/", include_in_schema=False)
        async def index():
            return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": _CSP})

    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    yield
    app.state.server.worker.close()

_EDIT_FIELDS = {"prompt": {"type": "string"}, "n": {"type": "integer", "minimum": 1},
                "size": {"type": "string"}, "response_format": {"type": "string", "enum": ["b64_json", "url"]},
                "model": {"type": "string"}, "num_inference_steps": {"type": "integer", "minimum": 1},
                "guidance_scale": {"type": "number"}, "seed": {"type": "integer"},
                "stream": {"type": "boolean"}}
_EDIT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image", "prompt"], "properties": {
        "image": {"type": "string", "format": "binary"}, **_EDIT_FIELDS}}},
    "application/json": {"schema": {"type": "object", "required": ["image", "prompt"], "properties": {
        "image": {"type": "string", "description": "data: URL"}, **_EDIT_FIELDS}}},
}}}


async def _read_edit_request(request: Request, limits: ServeLimits) -> tuple[dict, list[bytes]]:
    """-> (fields, uploaded image files) from a multipart form or a JSON body."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=limits.max_images, max_fields=64)
        except (APIError, StarletteHTTPException):
            raise
        except Exception as error:  # noqa: BLE001 - starlette's MultiPartException and parser errors
            raise APIError(400, f"could not read the multipart form: {error}", None, "invalid_form") from None
        fields, uploads = {}, []
        for key, value in form.multi_items():
            name = key.removesuffix("[]")
            if isinstance(value, UploadFile):
                if name != "image":
                    raise APIError(400, f"unexpected file field {key!r}: images go in 'image'", key,
                                   "invalid_form")
                uploads.append(await value.read())
            elif name == "image":
                fields.setdefault("image", []).append(value)  # an image sent as a URL string
            else:
                fields[name] = value
        return fields, uploads
    if content_type.startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as error:
            raise _json_error(error) from None
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON (nor UTF-8 text)", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object", None, "invalid_json")
        return body, []
    raise APIError(400, "send the edit as multipart/form-data (OpenAI's form) or application/json",
                   None, "unsupported_content_type")


# ------------------------------------------------------------------------------------------------ errors
_UNION_BRANCHES = frozenset({"str", "int", "float", "bool", "dict", "list"})


def _json_error(error: json.JSONDecodeError) -> APIError:
    return APIError(400, f"the request body is not valid JSON: {error.msg} at line {error.lineno} column "
                         f"{error.colno} (character {error.pos})", None, "invalid_json")


def _describe_validation(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic errors -> (message, param) in OpenAI's style: the deepest error, its field as a dotted path.

    The deepest, because a union reports one error per branch: content that is neither a string nor a valid
    list of parts gets "content.str: Input should be a valid string" first, while the part's own error (say
    "content.list[...].0.text: Field required") is the one that says what to fix.
    """
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {"loc": (), "msg": "invalid request"}
    loc, param = list(first.get("loc", ())), ""
    for part in loc[1:] if loc[:1] == ["body"] else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier() and part not in _UNION_BRANCHES:  # union branches: "str", "list[str]", "text-part"
            param += f".{part}" if param else part
    param = param or None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}{more}", param


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        errors = list(error.errors())
        if errors and errors[0].get("type") == "json_invalid":  # FastAPI's report: loc ("body", offset)
            doc, pos = error.body, errors[0]["loc"][-1]
            if isinstance(doc, str) and isinstance(pos, int):
                reason = errors[0].get("ctx", {}).get("error", "JSON decode error")
                return JSONResponse(_json_error(json.JSONDecodeError(reason, doc, pos)).body(), status_code=400)
        message, param = _describe_validation(errors)
        return JSONResponse(APIError(400, message, param, "invalid_request").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(error.status_code)
        return JSONResponse(APIError(error.status_code, str(error.detail), None, code).body(),
                            status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(APIError(500, f"internal error ({type(error).__name__}); the server is still running",
                                     None, "internal_error").body(), status_code=500)


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, declared (Content-Length) or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def error(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes "
                             "(server limit --max-request-bytes)", None, "request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await JSONResponse(self.error().body(), status_code=413)(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing to the 413 handler.
                    raise StarletteHTTPException(413, self.error().message)
            return message

        await self.app(scope, counting_receive, send)


# ------------------------------------------------------------------------------------------------ running
class ServerThread:
    """uvicorn serving ``app`` on a loopback port from a background thread (tests, benchmarks, the fuzzer).

        with ServerThread(create_app(pipe)) as server:
            httpx.get(server.url + "/healthz")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="emu2-uvicorn", daemon=True)
        self.url = ""

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
