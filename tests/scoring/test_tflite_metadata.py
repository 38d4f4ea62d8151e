"""Bundle metadata read and replaced without a schema module, as on a device with only tflite-runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.scoring import bundle as bundle_mod
from edge_agent.scoring.bundle import METADATA_NAME, ModelError, bundle_from_bytes, embed_metadata, read_metadata
from edge_agent.scoring.calibrate import calibrate
from edge_agent.scoring.runtime import ModelRuntime
from edge_agent.scoring.tflite_metadata import find_metadata, read_metadata_bytes, replace_metadata_bytes

ROOT = Path(__file__).parents[2]
BUNDLES = [
    ROOT / "tests" / "fixtures" / "pump-i8.tflite",
    ROOT / "tests" / "fixtures" / "pump-f32.tflite",
    ROOT / "models" / "pump-skid-ae.tflite",
    ROOT / "models" / "skab" / "skab-pump-ae.tflite",
    ROOT / "models" / "skab" / "skab-pump.tflite",
]


def schema_metadata(data: bytes) -> bytes:
    """The metadata bytes as the schema module (the reference reader) sees them."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() == METADATA_NAME.encode():
            return bytes(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    raise AssertionError("no metadata")


def outputs(data: bytes) -> np.ndarray:
    """The model's output on a fixed input: patching metadata must not change the model."""
    rt = ModelRuntime(bundle_from_bytes(data))
    meta = read_metadata(data)
    x = np.random.default_rng(1).normal(size=(2, meta.window, len(meta.inputs))).astype(np.float32)
    return rt.run(x)


@pytest.mark.parametrize("path", BUNDLES, ids=lambda p: p.name)
def test_reader_agrees_with_the_schema_module(path: Path) -> None:
    data = path.read_bytes()
    assert read_metadata_bytes(data, METADATA_NAME) == schema_metadata(data)
    assert read_metadata_bytes(data, "no-such-entry") is None


@pytest.mark.parametrize("grow", [False, True], ids=["in-place", "appended"])
@pytest.mark.parametrize("path", BUNDLES[:2], ids=lambda p: p.name)
def test_replaced_metadata_reads_back_and_the_model_is_unchanged(path: Path, grow: bool) -> None:
    data = path.read_bytes()
    old = read_metadata_bytes(data, METADATA_NAME)
    assert old is not None
    blob = b'{"x":"' + (b"y" * (len(old) + 100 if grow else 10)) + b'"}'
    patched = replace_metadata_bytes(data, METADATA_NAME, blob)
    assert patched is not None
    assert (len(patched) > len(data)) == grow
    assert read_metadata_bytes(patched, METADATA_NAME) == blob == schema_metadata(patched)
    if grow:
        found = find_metadata(patched, METADATA_NAME)
        assert found is not None and found.start % 16 == 0
    # the interpreter (which verifies the flatbuffer) loads it and computes the same thing
    real = embed_metadata(patched, read_metadata(data))
    np.testing.assert_array_equal(outputs(real), outputs(data))


def test_a_damaged_metadata_table_is_a_model_error() -> None:
    data = bytearray(BUNDLES[0].read_bytes())
    root = int.from_bytes(data[0:4], "little")
    data[root : root + 4] = (2**31 - 1).to_bytes(4, "little")  # the root table's vtable far outside the file
    with pytest.raises(ModelError, match="damaged model file"):
        read_metadata(bytes(data), "bad.tflite")


def test_calibration_without_a_schema_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """tflite-runtime ships no schema module: loading and recalibrating a bundle must not need one."""
    import ai_edge_litert

    monkeypatch.setitem(sys.modules, "ai_edge_litert.schema_py_generated", None)
    monkeypatch.delattr(ai_edge_litert, "schema_py_generated", raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(ModelError, match="needs ai-edge-litert"):
        bundle_mod._schema()
    base = bundle_from_bytes(BUNDLES[0].read_bytes())
    meta = base.metadata
    rng = np.random.default_rng(0)
    mean, scale = np.asarray(meta.normalisation.mean), np.asarray(meta.normalisation.scale)
    rows = mean + 2.0 * scale * rng.standard_normal((400, len(meta.inputs)))
    new = calibrate(base, rows)
    assert new.metadata.normalisation.scale != meta.normalisation.scale
    assert read_metadata(new.data) == new.metadata
    assert outputs(new.data).shape == outputs(base.data).shape
