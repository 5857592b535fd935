"""Request bodies of the OpenAI endpoints, validated strictly (a "5" is not an integer, as at OpenAI).

Unknown fields are accepted and ignored, as clients send extras (`user`, `store`, `metadata`), except
the features this server does not have (`UNSUPPORTED`), which are refused by name rather than
silently ignored. medgem additions: `reasoning` (see serve/reasoning.py), `recipe` (with `series` and
`max_slices` for ct/mri, `tissue`, `procedure` and `max_patches` for wsi: MedGemma 1.5's input layouts,
serve/inputs.py), `window` on an
`image_url` (the DICOM display window: a CT preset, "C/W", "minmax" or "auto"), `image_url`
parts among the inputs of an embedding request (MedSigLIP embeds images and texts in one space), and
vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`) on chat and completions.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from medgem.inputs.text import clean_json

# Fields that would change what the client gets back; refused unless absent, null, 0, false or empty.
UNSUPPORTED = ("functions", "function_call", "suffix", "best_of", "dimensions", "audio", "modalities", "prediction")


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _clean(cls, data: object) -> object:
        """Text enters here once: lone surrogates (legal JSON escapes) and NULs made safe for the tokenizer."""
        return clean_json(data)

    def unsupported(self) -> str | None:
        """The first feature asked for that this server does not have."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED:
            value = extra.get(name)
            if value not in (None, False, [], {}, ""):
                return name
        return None


class _Part(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Part):
    url: str
    detail: Literal["auto", "low", "high"] | None = None
    window: str | None = None


class TextPart(_Part):
    type: Literal["text"]
    text: str


class ImagePart(_Part):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Part):
    name: str = Field(min_length=1)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Part):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Part):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None  # None only on an assistant message that carries tool_calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # on assistant messages
    tool_call_id: str | None = None  # on tool messages: which call this is the result of


class JsonSchemaFormat(_Part):
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Part):
    """vLLM's extension: one of these constrains the output."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDef(_Part):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(_Part):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Part):
    name: str


class NamedToolChoice(_Part):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Part):
    include_usage: bool = False


class SamplingFields(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch's generators take
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks, load tests)
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                          Field(max_length=4)] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (as text) -> bias
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    reasoning: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # MedGemma 1.5's input recipes (processing/recipes.py; serve/inputs.py recipe_prompt)
    recipe: Literal["ct", "mri", "wsi", "longitudinal", "localize"] | None = None
    series: str | None = None  # ct/mri: the SeriesInstanceUID to read when the upload holds several
    max_slices: int | None = Field(None, ge=1)  # ct/mri: at most this many slices (default 85)
    tissue: str | None = Field(None, max_length=200)  # wsi: e.g. "colon"
    procedure: str | None = Field(None, max_length=200)  # wsi: e.g. "biopsy"
    max_patches: int | None = Field(None, ge=1)  # wsi: at most this many patches (default 125)


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    logprobs: int | None = Field(None, ge=0, le=20)  # the top-n per token (OpenAI allows 5, vLLM 20)
    echo: bool = False


class EmbeddingRequest(_Body):
    model: str
    input: str | Annotated[list[str | ImagePart], Field(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"


class TokenizeRequest(_Body):
    model: str
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str
    tokens: Annotated[list[int], Field(max_length=1_000_000)]
