"""Fixtures shared by the KV-stream tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def closing() -> Iterator[list]:
    """Objects a test opens (transports, endpoints), closed after it in reverse order."""
    objs: list = []
    yield objs
    for obj in reversed(objs):
        obj.close()
