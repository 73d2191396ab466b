"""The OpenAI wire format the server speaks: request bodies, responses, and the JSON error.

Only what Emu2 can honour is declared. Other OpenAI fields are listed in `UNSUPPORTED_CHAT_FIELDS` /
`UNSUPPORTED_IMAGE_FIELDS` (refused with a 400 naming the field unless their value asks for nothing, such as
``tools: []`` or ``logprobs: false``, which clients send as defaults) or in `IGNORED_FIELDS` (bookkeeping with no
effect on the answer, accepted); any other field is refused as unrecognized, as OpenAI does, so a misspelt knob
is not silently dropped. Fields marked *extension* are ours: ``num_beams``/``grounding``/``top_k``/
``length_penalty`` for chat (the official Emu2-Chat decoding knobs), ``images``/``objects``/
``num_inference_steps``/``guidance_scale``/``seed`` for images (Emu2-Gen inputs). OpenAI's ``modalities`` is
declared and taken as ``["text"]`` or ``["text", "image"]`` only (answers with images, with the extensions
``max_images``/``image_at``/``num_inference_steps``/``guidance_scale``: see `emu2.serve.interleaved_chat`,
which refuses every other value).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


class APIError(Exception):
    """An error the client caused (4xx) or the server met (5xx), sent as OpenAI's ``{"error": {...}}``."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        kind = self.kind or self.TYPES.get(self.status,
                                           "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------------------------------------------- chat
class _Open(BaseModel):
    # Extra fields are kept (in ``model_extra``) so the server can name them: see `refused_field`.
    model_config = ConfigDict(extra="allow")


# field -> (what it asks for, the values that ask for nothing). None is always accepted as "not given".
UNSUPPORTED_CHAT_FIELDS: dict[str, tuple[str, tuple]] = {
    "tools": ("tool (function) calling", ([],)),
    "tool_choice": ("tool (function) calling", ("none", "auto")),
    "functions": ("function calling", ([],)),
    "function_call": ("function calling", ("none", "auto")),
    "response_format": ("structured output (JSON mode or a JSON schema)", ({"type": "text"},)),
    "logprobs": ("log probabilities", (False,)),
    "top_logprobs": ("log probabilities", (0,)),
    "logit_bias": ("logit bias", ({},)),
    "frequency_penalty": ("frequency penalty", (0,)),
    "presence_penalty": ("presence penalty", (0,)),
    "audio": ("audio output", ()),
    "prediction": ("predicted outputs", ()),
    "web_search_options": ("web search", ()),
    "reasoning_effort": ("reasoning effort (Emu2 is not a reasoning model)", ()),
    "verbosity": ("verbosity control", ()),
    "store": ("stored completions (this server stores nothing)", (False,)),
}
# Fields of an OpenAI chat message Emu2 cannot take (tool calls; the "tool" role is refused by `ChatMessage`).
UNSUPPORTED_MESSAGE_FIELDS: dict[str, tuple[str, tuple]] = {
    "tool_calls": ("tool (function) calling", ([],)),
    "function_call": ("function calling", ()),
    "audio": ("audio", ()),
}
UNSUPPORTED_IMAGE_FIELDS: dict[str, tuple[str, tuple]] = {
    "quality": ("quality levels (use the num_inference_steps extension)", ("auto", "standard")),
    "style": ("DALL-E 3 styles", ()),
    "background": ("transparent backgrounds", ("auto", "opaque")),
    "output_format": ("output formats other than png", ("png",)),
    "output_compression": ("output compression (PNG is lossless)", ()),
    "partial_images": ("streamed partial images", (0,)),
    "input_fidelity": ("input fidelity levels", ("low",)),
}
# Bookkeeping fields that change nothing in the answer: accepted and ignored.
IGNORED_FIELDS = frozenset({"user", "metadata", "service_tier", "parallel_tool_calls", "safety_identifier",
                            "prompt_cache_key", "moderation"})
IGNORED_MESSAGE_FIELDS = frozenset({"name", "refusal"})


def refused_field(model: BaseModel, unsupported: dict[str, tuple[str, tuple]],
                  ignored: frozenset[str] = IGNORED_FIELDS) -> tuple[str, str] | None:
    """(field, reason) for the first extra field of ``model`` the server must refuse, or None."""
    for name, value in (model.model_extra or {}).items():
        if name in ignored or value is None:
            continue
        if name not in unsupported:
            return name, f"unrecognized request argument {name!r}"
        what, accepted = unsupported[name]
        # Multipart forms send every value as a string, so "0" stands for 0 there.
        if value in accepted or (isinstance(value, str) and value in {str(a) for a in accepted}):
            continue
        return name, f"{name!r} is not supported: this server does not do {what}"
    return None


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str = Field(description="a data: URL (base64), or a file:// URL under the server's --allowed-dir")
    detail: str | None = None  # accepted and ignored: Emu2 sees every image at the encoder's resolution


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Open):
    url: str = Field(description="an animated GIF, WebP or PNG as a data: URL (base64), or a file:// URL under the "
                                 "server's --allowed-dir; its frames are sampled as the official demo samples them")


class VideoPart(_Open):
    """A video as vLLM's OpenAI-compatible server takes one: ``{"type": "video_url", "video_url": {"url": ...}}``."""

    type: Literal["video_url"]
    video_url: VideoURL


class VideoFramesPart(_Open):
    """A video as its frames in order, ``{"type": "video", "video": [url, ...]}`` (the frame-list form of
    Qwen-VL's OpenAI-compatible API); each URL is an image as in `ImageURL`."""

    type: Literal["video"]
    video: list[str] = Field(description="frame images in order, as data: or allowed file:// URLs")


class OtherPart(_Open):
    """Any other content part (``input_audio``, ``file``, ...): parsed only so the server can name its type when it
    refuses it (400)."""

    type: Any = None


SUPPORTED_PART_TYPES = ("text", "image_url", "video_url", "video")


def _part_tag(part) -> str:
    # Tags are not identifiers ("text-part"), so error paths can tell them from field names (`_describe_validation`).
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return f"{kind}-part" if kind in SUPPORTED_PART_TYPES else "other-part"


ContentPart = Annotated[Annotated[TextPart, Tag("text-part")] | Annotated[ImagePart, Tag("image_url-part")]
                        | Annotated[VideoPart, Tag("video_url-part")] | Annotated[VideoFramesPart, Tag("video-part")]
                        | Annotated[OtherPart, Tag("other-part")], Discriminator(_part_tag)]


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Open):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="new tokens at most (capped by the server)")
    max_completion_tokens: int | None = Field(None, ge=1, description="alias of max_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0 or absent: deterministic decoding")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_beams: int | None = Field(None, ge=1, description="extension: beam search (the official demo uses 5)")
    length_penalty: float | None = Field(None, ge=-10, le=10, description="extension: beam-search length penalty "
                                         "(the official demo frontend uses 2)")
    top_k: int | None = Field(None, ge=1, description="extension: top-k sampling")
    grounding: bool | None = Field(False, description="extension: answer with <phrase>/<object> box tokens")
    modalities: list[str] | None = Field(None, description='["text"] (default) or ["text", "image"]: an answer '
                                         "of ordered text and image_url parts (needs a server visual decoder)")
    max_images: int | None = Field(None, ge=0, description="extension: images in one answer (capped by the server)")
    image_at: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="extension: start an image once the answer holds this many text tokens (0: first)")
    num_inference_steps: int | None = Field(None, ge=1, description="extension: denoising steps per answer image")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="extension: decoder guidance scale")


AnswerPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | list[AnswerPart] = Field(description="text, or with modalities [\"text\", \"image\"] the "
                                                        "ordered text and image_url parts")


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


# -------------------------------------------------------------------------------------------------- images
class GroundedObject(_Open):
    """Extension: one object placed in the generated image (official grounded generation)."""

    phrase: str = Field(description="the words that name the object, e.g. 'a dog'")
    box: list[float] = Field(min_length=4, max_length=4,
                             description="x1, y1, x2, y2 in pixels of the 448x448 layout canvas (official draw_box)")
    image: str | None = Field(None, description="optional subject image (data: or allowed file:// URL)")


class ImageGenerationRequest(_Open):
    prompt: str = Field(description="the text; [<IMG_PLH>] marks where each of `images` goes")
    model: str | None = None
    n: int | None = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT, or 'auto' / absent for the decoder's default")
    response_format: Literal["b64_json", "url"] | None = Field(
        "b64_json", description="b64_json (PNG); 'url' returns a data: URL (nothing is stored on the server)")
    images: list[str] = Field(default_factory=list, description="extension: input images as data:/file:// URLs")
    objects: list[GroundedObject] = Field(default_factory=list, description="extension: grounded objects")
    num_inference_steps: int | None = Field(None, ge=1, description="extension: denoising steps (official 50)")
    guidance_scale: float | None = Field(None, ge=0, le=50, description="extension: classifier-free guidance")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="extension: seed of the initial noise (image k uses seed + k)")
    stream: bool | None = Field(False, description="server-sent events: each denoising step as an emu2.status "
                                                   "event, each image as image_generation.completed")


class ImageEditRequest(ImageGenerationRequest):
    """The JSON form of /v1/images/edits: ``image`` (one URL or a list) is put before the prompt."""

    image: str | list[str] | None = Field(None, description="image(s) to edit as data:/file:// URLs")
    mask: str | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImageInputTokens(BaseModel):
    text_tokens: int
    image_tokens: int


class ImageUsage(BaseModel):
    """OpenAI's image ``usage``, in Emu2's units: the prompt's tokens (each input image counted as its visual
    slots) and, as output, the visual embeddings the model regressed (``n_query`` per image drawn)."""

    input_tokens: int
    input_tokens_details: ImageInputTokens
    output_tokens: int
    total_tokens: int


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png"] = "png"
    size: str
    usage: ImageUsage | None = None


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "emu2"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
