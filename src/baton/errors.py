"""Errors that belong to one request, and the checks that raise them.

A request's bad field is an InvalidRequest naming the field (as the OpenAI API
spells it), so the server can answer 400 with `param` set without parsing the
message, and the engine never queues what it cannot serve.
"""
from __future__ import annotations


class InvalidRequest(ValueError):
    """A request field outside what the engine accepts; the message names the
    field and the allowed range."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_unicode(text: str, param: str) -> None:
    """JSON can carry a lone UTF-16 surrogate ("\\udc80"), which no tokenizer can
    encode: reject it by name instead of failing deep inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(param, f"{param} is not valid Unicode: lone surrogate "
                                    f"{text[e.start]!r} at character {e.start}") from None
