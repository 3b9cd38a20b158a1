"""JSON text that parses but is not Unicode text: lone UTF-16 surrogates.

JSON lets a string spell `\\ud800` alone; Python's parser accepts it, and the first tokenizer, encoder or
log line that sees the string fails. A client's bad input must be a 400 naming the problem, so bodies
are checked once, up front. Only bodies that spell a surrogate escape at all are parsed for the check.
"""

from __future__ import annotations

import json
import re

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def lone_surrogate(body: bytes) -> str | None:
    """A message naming the first lone surrogate in a JSON body's strings or keys, or None."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not valid JSON at all: the app's own parser answers that
    todo = [doc]
    while todo:  # iterative: a deeply nested body must not exhaust the stack
        node = todo.pop()
        if isinstance(node, dict):
            todo.extend(node.keys())
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as e:
                return (
                    f"the body holds a lone surrogate ({node[e.start]!r}) in a string: JSON strings must be "
                    "valid Unicode text (a surrogate escape needs its pair)"
                )
    return None
