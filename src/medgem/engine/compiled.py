"""The optional torch.compile path: a model's decoder layers compiled, its embedding and LM head eager.

Why this shape, measured on the 2-core VM with the int8 270M (benchmarks/decode.py):
- Only `Gemma3Text.decoder` (layers and final norm) is compiled. The embedding lookup (rows read
  from the checkpoint file) and the LM head (oneDNN's packed int8 GEMM, an opaque tensor) cannot be
  traced; compiling the whole model split it into five graphs, each step paying five entries.
- Dynamo checks ~8,000 guards on the model's module tree before every step: 1.0 ms a token, a tenth
  of the token. The structure of a loaded model never changes, so guards on its modules are skipped
  (`torch.compiler.skip_guard_on_all_nn_modules_unsafe`: 0.2 ms). That is only sound while one cache
  of compiled code serves one model, so each model gets its own copy of the function's code object
  (dynamo keeps compiled code per code object) and two compiled models never share graphs.
- Inductor's per-call size asserts (~500 Python calls a step) are off.
- Python floats are compiled as the constants they are (dynamo's `specialize_float`, set only while
  the decoder runs). Left symbolic, every norm's eps and the attention scale became graph inputs, and
  dynamo restarted its analysis to turn them into tensors: 95 s of compiling against 72 (12 against
  32 s when inductor's on-disk cache holds the graphs), and decoding 2.5 % slower (paired runs).
A compiled model must not be changed afterwards (new weights, LoRA, another dtype).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from medgem.nn.text import Gemma3Text

OPTIONS = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe, "size_asserts": False}


def compile_decoder(model: nn.Module) -> None:
    """Compile the decoder of a Gemma3Text (or of a multimodal model's language model) in place."""
    text = getattr(model, "language_model", model)
    if not isinstance(text, Gemma3Text):
        raise TypeError(f"compile_decoder needs a Gemma 3 text model, not {type(text).__name__}")
    plain = Gemma3Text.decoder
    own = types.FunctionType(plain.__code__.replace(), plain.__globals__, plain.__name__, plain.__defaults__,
                             plain.__closure__)
    compiled = torch.compile(types.MethodType(own, text), dynamic=True, options=OPTIONS)

    def decoder(*args: object) -> torch.Tensor:
        with torch._dynamo.config.patch(specialize_float=True):  # compiling happens inside a call
            return compiled(*args)

    text.decoder = decoder
