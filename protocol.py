"""The OpenAI-compatible HTTP API, stated once: request and response models with their validation (pydantic).

Unknown fields are ignored (clients send many); a known field with a value fastllama does not support is refused
(400, naming the field) rather than silently ignored. server.py turns every validation error into OpenAI's error
shape. References: OpenAI's API reference (completions, chat completions); vLLM's entrypoints/openai/protocol.py.
"""
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_N = 16  # choices per request


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # a string a tokenizer can read


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def _refuse_set(cls, v, info):
    """A validator for known fields fastllama does not support: refused when set to anything but their default."""
    if v:
        raise ValueError(f"{info.field_name} is not supported by fastllama")
    return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Generation(BaseModel):
    """The fields completions and chat completions share."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, description="the served model's name (GET /v1/models); any other is a 404")
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, description="sample among the k most likely tokens; -1 or 0: all")
    seed: int | None = Field(None, description="the same seed gives the same text, whatever else runs beside it")
    stop: Text | list[Text] | None = Field(None, description="up to 16 strings that end the text (not included)")
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="the model's end-of-text tokens do not end the text")
    min_tokens: int = Field(0, ge=0, description="no end-of-text token before this many tokens")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    refuse_penalties = field_validator("presence_penalty", "frequency_penalty", "logit_bias")(_refuse_set)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop strings")
        return v


class CompletionRequest(_Generation):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="text, texts, token ids, or lists of token ids")
    max_tokens: int | None = Field(16, ge=1, description="most new tokens (clipped to the context)")
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probabilities of the chosen and k best tokens")
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    refuse_echo = field_validator("echo", "suffix")(_refuse_set)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        if v is not None and v > 1:
            raise ValueError("best_of > 1 is not supported by fastllama")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the prompt list is empty")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] = Field(description="text, or a list of text parts (other parts are not supported)")
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="most new tokens (default: what the context holds)")
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens (wins over it)")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    response_format: dict[str, Any] | None = None
    audio: Any | None = None
    prediction: Any | None = None

    refuse_tools = field_validator("tools", "tool_choice", "functions", "function_call", "audio", "prediction")(
        _refuse_set)

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        if v and v.get("type", "text") != "text":
            raise ValueError("only {'type': 'text'} is supported by fastllama")
        return v


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "fastllama"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizePrompt(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: Text
    add_special_tokens: bool = Field(True, description="the BOS token where the model's tokenizer adds one")


class TokenizeChat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, description="a conversation, in the model's chat template")


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str
