"""The OpenAI request bodies we accept (pydantic), and the one-line error shape.

Unknown fields are ignored (clients send `user`, `metadata`, ...); a known field with a wrong type or value is a
400 naming it. Fields that would change the answer in a way we do not implement are rejected, never ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Int = Annotated[int, Field(strict=True)]
Num = Annotated[float, Field(allow_inf_nan=False)]


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(Lenient):
    include_usage: bool = False


class Sampling(Lenient):
    """Fields shared by chat and text completions (OpenAI's, plus llama.cpp's top_k/min_p/repetition_penalty)."""

    model: str | None = None
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(strict=True, ge=0)] = 0
    min_p: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 1.0
    presence_penalty: Annotated[float, Field(ge=0, le=0)] = 0.0    # accepted only at their no-op value
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] = 0.0
    seed: Annotated[int, Field(strict=True, ge=-(2**63), lt=2**63)] | None = None
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(max_length=16)] | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(strict=True, ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None

    @field_validator("tools", "functions")
    @classmethod
    def no_tools(cls, value: list[Any] | None) -> list[Any] | None:
        # a request that offers tools is refused rather than answered as if it had none
        if value:
            raise ValueError("tool calling is not supported by this server")
        return value


class CompletionRequest(Sampling):
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                             Field(min_length=1, max_length=16)]
             | Annotated[list[Int], Field(min_length=1)] | Annotated[list[Annotated[list[Int], Field(min_length=1)]],
                                                                   Field(min_length=1, max_length=16)])
    max_tokens: Annotated[int, Field(strict=True, ge=1)] | None = 16
    logprobs: Annotated[int, Field(strict=True, ge=0, le=5)] | None = None
    echo: Literal[False] = False
    suffix: None = None
    best_of: Literal[1] | None = None
    response_format: dict[str, Any] | None = None


class EmbeddingRequest(Lenient):
    model: str | None = None
    input: (Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                            Field(min_length=1, max_length=256)]
            | Annotated[list[Int], Field(min_length=1)] | Annotated[list[Annotated[list[Int], Field(min_length=1)]],
                                                                  Field(min_length=1, max_length=256)])
    encoding_format: Literal["float", "base64"] = "float"
    pooling: Literal["mean", "last"] = "mean"


class TokenizeRequest(Lenient):
    content: str
    add_special: bool = True


class DetokenizeRequest(Lenient):
    tokens: list[Int]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
