"""The TFLite interpreter around a bundle: quantize, invoke, dequantize, with parameters read from the model."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.scoring.base import plugin_for
from edge_agent.scoring.bundle import Bundle, ModelError

F32 = npt.NDArray[np.float32]


def interpreter_class() -> tuple[Any, str]:
    """LiteRT's Interpreter, or tflite-runtime's where that is the one installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter, "ai-edge-litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter, "tflite-runtime"
    except ImportError as exc:
        raise ModelError("no TFLite runtime installed: pip install ai-edge-litert") from exc


class _Tensor:
    """One input or output tensor: index, dtype and its quantization (scale 0 means float)."""

    def __init__(self, details: dict[str, Any]) -> None:
        self.index = int(details["index"])
        self.dtype = np.dtype(details["dtype"])
        self.shape = tuple(int(d) for d in details["shape"])
        scale, zero = details.get("quantization", (0.0, 0))
        self.scale = float(scale)
        self.zero = int(zero)
        self.quantized = self.scale != 0.0 and self.dtype.kind in "iu"
        # float32 scalars, computed once: the hot path must not convert Python floats per call
        self.scale_f = np.float32(self.scale)
        self.inv_scale = np.float32(1.0 / self.scale) if self.scale else np.float32(0.0)
        self.zero_f = np.float32(self.zero)
        if self.quantized:
            info = np.iinfo(self.dtype)
            self.lo, self.hi = np.float32(info.min), np.float32(info.max)


class ModelRuntime:
    """Runs a bundle's model on windows of normalised values, batch by batch."""

    def __init__(self, bundle: Bundle, *, num_threads: int = 1) -> None:
        meta = bundle.metadata
        where = bundle.path or meta.name  # errors name the file, as load_bundle's do
        cls, self.runtime_name = interpreter_class()
        try:
            self._interp = cls(model_content=bundle.data, num_threads=num_threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            why = " ".join(str(exc).split())  # the runtime's messages may span lines
            raise ModelError(f"{where}: the runtime cannot load the model: {why}") from exc
        inputs, outputs = self._interp.get_input_details(), self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{where}: expected one input and one output tensor, got {len(inputs)}/{len(outputs)}")
        self.input, self.output = _Tensor(inputs[0]), _Tensor(outputs[0])
        want, kind = (meta.window, len(meta.inputs)), plugin_for(meta.score.kind)
        want_out = kind.output_shape(meta)  # what the kind's scorer reads per window
        if self.input.shape[1:] != want or self.output.shape[1:] != want_out:
            expected = f"window × inputs {want}" + ("" if want_out == want else f" → {want_out} ({kind.key})")
            raise ModelError(
                f"{where}: tensors {self.input.shape}→{self.output.shape} do not match the metadata's {expected}"
            )
        self.batch = self.input.shape[0]

    def _resize(self, batch: int) -> None:
        shape = [batch, *self.input.shape[1:]]
        self._interp.resize_tensor_input(self.input.index, shape)
        self._interp.allocate_tensors()
        self.input = _Tensor(self._interp.get_input_details()[0])
        self.output = _Tensor(self._interp.get_output_details()[0])
        self.batch = batch

    def run(self, x: F32) -> F32:
        """Model output for a batch of normalised windows (batch × window × inputs), in float32."""
        if x.shape[0] != self.batch:
            self._resize(x.shape[0])
        t = self.input
        if t.quantized:
            # at batch 1 each numpy call costs about a microsecond: few calls, all in place;
            # np.minimum/np.maximum because np.clip's argument handling costs ~5 µs on its own
            q = x * t.inv_scale
            q += t.zero_f
            np.rint(q, out=q)
            np.minimum(q, t.hi, out=q)
            np.maximum(q, t.lo, out=q)
            self._interp.set_tensor(t.index, q.astype(t.dtype))
        else:
            self._interp.set_tensor(t.index, x.astype(t.dtype, copy=False))
        self._interp.invoke()
        out = self._interp.get_tensor(self.output.index)
        o = self.output
        if o.quantized:
            r = out.astype(np.float32)
            r -= o.zero_f
            r *= o.scale_f
            return r
        return out.astype(np.float32)  # a copy: the interpreter reuses its output buffer

    def describe(self) -> dict[str, Any]:
        """Tensor shapes, types and quantization, for `model inspect`."""
        return {
            "runtime": self.runtime_name,
            "input": {
                "shape": list(self.input.shape),
                "dtype": self.input.dtype.name,
                "scale": self.input.scale,
                "zero_point": self.input.zero,
            },
            "output": {
                "shape": list(self.output.shape),
                "dtype": self.output.dtype.name,
                "scale": self.output.scale,
                "zero_point": self.output.zero,
            },
        }
