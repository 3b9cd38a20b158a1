"""Request bodies of the HTTP API as pydantic models, so /openapi.json describes them.

Models are strict (no "5" → 5 or 5.0 → 5 coercion: a bootstrap room is a 63-bit integer and nothing
else) and ignore fields they do not know, as SGLang's own server does, so routers and frontends that
add fields keep working. SGLang fields this server does not implement are declared and refused when set,
never silently dropped. Sampling parameters stay a free-form map here: `SamplingParams.from_dict` owns
their validation.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# SGLang's router draws rooms as random non-negative 63-bit integers.
Room = Annotated[int, Field(ge=0, lt=1 << 63)]
Port = Annotated[int, Field(ge=1, le=65535)]
NonNegative = Annotated[int, Field(ge=0)]
LogprobStart = Annotated[int, Field(ge=-1)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class PDFields(_Body):
    """The PD contract's fields (DESIGN §4): the router adds them to the same body it sends both servers.
    A batch carries one entry per prompt."""

    bootstrap_host: str | list[str | None] | None = None
    bootstrap_port: Port | list[Port | None] | None = Field(
        default=None, description="the prefill's bootstrap port; null means the decode server's default"
    )
    bootstrap_room: Room | list[Room] | None = None


class GenerateReqInput(PDFields):
    """SGLang's native `/generate` body."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = Field(
        default=None, description="request id; a single id names a batch's items <rid>_<i>"
    )
    return_logprob: bool | list[bool] = False
    logprob_start_len: LogprobStart | list[LogprobStart] = -1
    top_logprobs_num: NonNegative | list[NonNegative] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    # SGLang fields without an implementation here: accepted only when unset.
    image_data: Any = None
    audio_data: Any = None
    video_data: Any = None
    input_embeds: Any = None
    lora_path: Any = None
    session_params: Any = None
    custom_logit_processor: Any = None
    return_hidden_states: bool = False

    def unsupported_fields(self) -> list[str]:
        names = ["image_data", "audio_data", "video_data", "input_embeds", "lora_path", "session_params",
                 "custom_logit_processor", "return_hidden_states"]
        return [n for n in names if getattr(self, n) not in (None, False, [], {})]


class AbortReqInput(_Body):
    rid: str = ""
    abort_all: bool = False


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's response_format; json_object and json_schema constrain the output (SGLang's mapping)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type json_schema needs json_schema.schema")
        return self

    def json_schema_param(self) -> str | None:
        """The json_schema sampling parameter this format means: any object for json_object."""
        if self.type == "json_object":
            return '{"type": "object"}'
        if self.type == "json_schema" and self.json_schema is not None:
            return json.dumps(self.json_schema.schema_)
        return None


class OpenAISampling(PDFields):
    """OpenAI sampling fields plus SGLang's extensions to them (sglang.srt.entrypoints.openai)."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    no_stop_trim: bool | None = None
    stop_token_ids: list[int] | None = None
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    response_format: ResponseFormat | None = None
    rid: str | list[str] | None = None

    @field_validator("response_format")
    @classmethod
    def _one_constraint(cls, value: ResponseFormat | None, info: ValidationInfo) -> ResponseFormat | None:
        constrained = any(info.data.get(k) is not None for k in ("regex", "json_schema", "ebnf"))
        if value is not None and value.json_schema_param() is not None and constrained:
            raise ValueError("give response_format or one of regex, json_schema and ebnf, not both")
        return value

    def sampling_dict(self, max_new_tokens: int | None) -> dict[str, Any]:
        """The SGLang `sampling_params` these fields mean; None values keep SGLang's defaults."""
        fmt = self.response_format.json_schema_param() if self.response_format is not None else None
        d: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "n": self.n,
            "stop": self.stop,
            "sampling_seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": self.logit_bias,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "min_new_tokens": self.min_tokens,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "no_stop_trim": self.no_stop_trim,
            "stop_token_ids": self.stop_token_ids,
            "regex": self.regex,
            "json_schema": fmt if fmt is not None else self.json_schema,
            "ebnf": self.ebnf,
        }
        return {k: v for k, v in d.items() if v is not None or k == "max_new_tokens"}

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(OpenAISampling):
    """`/v1/completions`; a list prompt is a batch whose choices carry their prompt's index."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: NonNegative | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # a JSON object, as OpenAI sends it


class AssistantToolCall(_Body):
    """A tool call of an earlier assistant turn, as the client sends the conversation back."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(_Body):
    model_config = ConfigDict(strict=True, extra="allow")  # name, ... reach the template

    role: ChatRole
    content: str | list[TextPart] | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None

    def template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {**(self.model_extra or {}), "role": self.role, "content": content or ""}
        if self.tool_calls is not None:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionDefinition(_Body):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(OpenAISampling):
    """`/v1/chat/completions`; the prompt is the chat template applied to `messages` (and `tools`)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: NonNegative | None = None
    max_completion_tokens: NonNegative | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # SGLang's extensions, with --reasoning-parser: reasoning apart from the answer, streamed as it comes.
    separate_reasoning: bool = True
    stream_reasoning: bool = True


class ConcateAndAppendReqInput(_Body):
    """SGLang frontend's join of forked program states: the forks' state ids and the destination's."""

    src_rids: list[str] = Field(min_length=1)
    dst_rid: str
