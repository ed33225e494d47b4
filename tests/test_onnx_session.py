"""The consumer's ONNX Runtime sessions are polite on a shared host: no spinning threads."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from aftertune.store.consumer.runtime import onnx_session


def test_a_consumer_session_does_not_spin_for_work(tmp_path: Path) -> None:
    # Spinning pool threads took the cores from concurrent calls: 1.8x fewer MiniLM answers
    # a second on a shared 2-core host (docs/benchmarks.md).
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), tmp_path / "model.onnx")
    options = onnx_session(tmp_path / "model.onnx").get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
