"""The OpenAI HTTP API as lorakit serves it: request checking and response bodies, no I/O.

Requests are checked field by field before anything reaches the model: a missing field or one
of the wrong JSON type is 422, an unknown field or an unsupported value 400 (each naming the
field), as the OpenAI API does for unknown arguments. Response and chunk bodies carry the
fields the official `openai` client parses.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

JSON_TYPES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


class ApiError(Exception):
    """An error answered with OpenAI's error body and an HTTP status."""

    TYPES = {
        401: "authentication_error",
        404: "invalid_request_error",
        429: "rate_limit_error",
        500: "server_error",
        503: "server_error",
    }

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


@dataclass(frozen=True)
class Field:
    """A request field: its accepted JSON types and a check of its value (a message if bad)."""

    types: tuple[type, ...]
    check: Callable[[Any], str | None] | None = None
    required: bool = False


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or lo <= v <= hi else f"must be in [{lo:g}, {hi:g}]"


def _at_least(lo: int) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or v >= lo else f"must be at least {lo}"


def _only(*allowed: Any) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else f"is not supported (only {allowed[0]!r})"


def _stop(v: Any) -> str | None:
    stops = [v] if isinstance(v, str) else (v or [])
    if not all(isinstance(s, str) and s for s in stops):
        return "must be a non-empty string or an array of non-empty strings"
    return "may hold at most 4 strings" if len(stops) > 4 else None


def _stream_options(v: Any) -> str | None:
    if v is None:
        return None
    if set(v) - {"include_usage"} or not isinstance(v.get("include_usage", False), bool):
        return 'must be {"include_usage": true|false}'
    return None


NUMBER = (int, float)
COMMON = {
    "model": Field((str,), required=True),
    "max_tokens": Field((int, type(None)), _at_least(1)),
    "temperature": Field(NUMBER + (type(None),), _between(0, 2)),
    "top_p": Field(NUMBER + (type(None),), lambda v: _between(0, 1)(v) or _nonzero(v)),
    "seed": Field((int, type(None))),
    "stop": Field((str, list, type(None)), _stop),
    "stream": Field((bool, type(None))),
    "stream_options": Field((dict, type(None)), _stream_options),
    "n": Field((int, type(None)), lambda v: None if v in (None, 1) else "must be 1"),
    "user": Field((str, type(None))),
    "frequency_penalty": Field(NUMBER + (type(None),), _only(0, None)),
    "presence_penalty": Field(NUMBER + (type(None),), _only(0, None)),
    "logit_bias": Field((dict, type(None)), lambda v: None if not v else "is not supported"),
}
COMPLETION = COMMON | {
    "prompt": Field((str, list), required=True),
    "echo": Field((bool, type(None)), _only(False, None)),
    "logprobs": Field((int, type(None)), _only(None, 0)),
    "suffix": Field((str, type(None)), _only(None, "")),
    "best_of": Field((int, type(None)), lambda v: None if v in (None, 1) else "must be 1"),
}
CHAT = COMMON | {
    "messages": Field((list,), required=True),
    "max_completion_tokens": Field((int, type(None)), _at_least(1)),
    "logprobs": Field((bool, type(None)), _only(False, None)),
    "top_logprobs": Field((int, type(None)), _only(None, 0)),
}


def _nonzero(v: Any) -> str | None:
    return "must be greater than 0" if v is not None and v <= 0 else None


def check_fields(body: Any, schema: dict[str, Field]) -> dict[str, Any]:
    """The body's fields, checked against `schema` (422 for types, 400 for values)."""
    if not isinstance(body, dict):
        raise ApiError(422, "the request body must be a JSON object")
    unknown = sorted(set(body) - set(schema))
    if unknown:
        raise ApiError(400, f"unrecognized request argument: '{unknown[0]}'", unknown[0])
    for name, spec in schema.items():
        if name not in body:
            if spec.required:
                raise ApiError(422, f"'{name}' is required", name)
            continue
        value = body[name]
        if not _has_type(value, spec.types):
            names = [JSON_TYPES[t] for t in spec.types if not (t is int and float in spec.types)]
            expected = " or ".join(names)
            raise ApiError(422, f"'{name}' must be {expected} (got {_json_type(value)})", name)
        problem = spec.check(value) if spec.check else None
        if problem:
            raise ApiError(400, f"'{name}' {problem} (got {value!r})", name)
    return body


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON true/false is not a number
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _json_type(value: Any) -> str:
    for t, name in JSON_TYPES.items():
        if type(value) is t:
            return name
    return type(value).__name__


def prompt_of(body: dict[str, Any]) -> str | list[int]:
    """A completion request's prompt: a string, a one-string array, or token ids."""
    prompt = body["prompt"]
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        raise ApiError(
            400, "'prompt' must be a string, one string in an array, or token ids", "prompt"
        )
    return prompt


def messages_of(body: dict[str, Any]) -> list[dict[str, str]]:
    """Chat messages as the chat template takes them ({"role", "content": str})."""
    out = []
    for i, message in enumerate(body["messages"]):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(422, f"'{where}' must be an object with a string 'role'", where)
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise ApiError(400, f"'{where}.{extra[0]}' is not supported", f"{where}.{extra[0]}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"'{where}.content': only text parts are supported", where)
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ApiError(422, f"'{where}.content' must be a string", where)
        out.append({"role": message["role"], "content": content})
    if not out:
        raise ApiError(400, "'messages' is empty", "messages")
    return out


def stops_of(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    return (stop,) if isinstance(stop, str) else tuple(stop or ())


# -- responses --------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    rid: str, model: str, text: str, finish: str | None, use: dict[str, int] | None, chat: bool
) -> dict[str, Any]:
    """A whole response (`use` given) or a stream chunk (`use` None)."""
    if chat:
        key = "message" if use is not None else "delta"
        choice = {
            "index": 0,
            key: {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }
        kind = "chat.completion" if use is not None else "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    body = {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if use is not None:
        body["usage"] = use
    return body


def usage_chunk(rid: str, model: str, use: dict[str, int], chat: bool) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": use,
    }


def model_card(name: str, root: str, parent: str | None, max_len: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "lorakit",
        "root": root,
        "parent": parent,
        "max_model_len": max_len,
    }
