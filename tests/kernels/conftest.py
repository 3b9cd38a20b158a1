"""Run the Triton kernels on the CPU through Triton's interpreter, in a child process.

The child (see interp_worker.py) imports Triton with TRITON_INTERPRET=1; this process and the rest of
the suite never see that setting.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import interp_worker
import pytest


class InterpretedKernels:
    """The public kernel entry points, executed by the interpreter in the child process."""

    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self._pool = pool

    def _call(self, module: str, name: str, *args: Any, **kwargs: Any) -> Any:
        return self._pool.submit(interp_worker.call, module, name, args, kwargs).result()

    def mla_decode(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("tpla_kernels.decode", "mla_decode", *args, **kwargs)

    def launch_mla_decode(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("tpla_kernels.decode", "launch_mla_decode", *args, **kwargs)

    def hadamard_transform(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("tpla_kernels.hadamard", "hadamard_transform", *args, **kwargs)


@pytest.fixture(scope="package")
def interp() -> Iterator[InterpretedKernels]:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=interp_worker.init) as pool:
        yield InterpretedKernels(pool)
