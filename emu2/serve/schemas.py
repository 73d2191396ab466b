"""The OpenAI wire format the server speaks: request bodies, responses, and the JSON error.

Only what Emu2 can honour is declared; any other field an OpenAI client sends (``user``, ``logprobs: false``,
``stream_options``, ...) is accepted and ignored, so stock clients work unchanged. Fields marked *extension* are
ours: ``num_beams``/``grounding``/``top_k``/``length_penalty`` for chat (the official Emu2-Chat decoding knobs),
``images``/``objects``/``num_inference_steps``/``guidance_scale``/``seed`` for images (Emu2-Gen inputs).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


class APIError(Exception):
    """An error the client caused (4xx) or the server met (5xx), sent as OpenAI's ``{"error": {...}}``."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
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
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are ignored, not rejected


class TextPart(_Open):
    type: Literal["text"]
    text: str


class ImageURL(_Open):
    url: str = Field(description="a data: URL (base64), or a file:// URL under the server's --allowed-dir")
    detail: str | None = None  # accepted and ignored: Emu2 sees every image at the encoder's resolution


class ImagePart(_Open):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


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


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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
    stream: bool | None = False


class ImageEditRequest(ImageGenerationRequest):
    """The JSON form of /v1/images/edits: ``image`` (one URL or a list) is put before the prompt."""

    image: str | list[str] | None = Field(None, description="image(s) to edit as data:/file:// URLs")
    mask: str | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png"] = "png"
    size: str


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "emu2"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]
