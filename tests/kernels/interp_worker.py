"""Child-process side of the CPU kernel tests: Triton is imported here with TRITON_INTERPRET=1.

Triton decides between compiling and interpreting when `triton.language` and each kernel are
decorated, i.e. at import, so the interpreter needs a process of its own to leave the rest of the
test suite untouched.

The interpreter stores bfloat16 as raw uint16 bits and its `tl.dot` multiplies those bits (an
interpreter limitation, triton-lang/triton#11584). `init` widens bfloat16 dot operands to float32
first, which is what the tensor cores compute on a GPU.
"""

from __future__ import annotations

import importlib
import os
from typing import Any


def init() -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    create_dot = InterpreterBuilder.create_dot

    def widen(h: TensorHandle) -> TensorHandle:
        if h.dtype != tl.bfloat16:
            return h
        return TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot_widened(self: InterpreterBuilder, a: TensorHandle, b: TensorHandle, d: TensorHandle,
                           *args: Any, **kwargs: Any) -> TensorHandle:
        return create_dot(self, widen(a), widen(b), d, *args, **kwargs)

    InterpreterBuilder.create_dot = create_dot_widened


def call(module: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return getattr(importlib.import_module(module), name)(*args, **kwargs)
