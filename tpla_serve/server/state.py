"""What every route handler of one server shares: its config, scheduler client, tokenizer and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from tpla_serve.config import ServerConfig
from tpla_serve.server.inputs import InputProcessor
from tpla_serve.server.metrics import ServerMetrics
from tpla_serve.server.scheduler_client import SchedulerClient


@dataclass
class FrontState:
    config: ServerConfig
    client: SchedulerClient
    tokenizer: Any | None
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    _inputs: InputProcessor | None = None

    @property
    def inputs(self) -> InputProcessor:
        """Available once the scheduler is ready (it reports the model's limits)."""
        if self._inputs is None:
            self.client.check_available()
            self._inputs = InputProcessor(self.tokenizer, self.client.model_info)
        return self._inputs

    @property
    def model_name(self) -> str:
        return self.config.model_name


def front_state(request: Request) -> FrontState:
    return request.app.state.front
