"""Writing an ONNX graph a step has rewritten (``per_row``, ``smooth``)."""

from __future__ import annotations

from pathlib import Path

# Protobuf's hard limit: bigger models keep their weights in an external data file.
_PROTOBUF_LIMIT = 1_800_000_000


def save_rewritten(model, nodes: list, out: Path) -> None:
    """``model`` with its graph's nodes replaced by ``nodes`` (in topological order) and
    the initializers no node reads dropped, saved to ``out`` (weights beside it in
    ``out.data`` past protobuf's limit)."""
    import onnx

    graph = model.graph
    graph.ClearField("node")
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    onnx.save_model(model, str(out), save_as_external_data=model.ByteSize() > _PROTOBUF_LIMIT,
                    location=out.name + ".data")
