"""Other formats in and out: ONNX export and import, and weight layouts of other tools."""
