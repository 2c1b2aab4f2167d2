"""Models out of the tool: `exporter` writes a run as keras/onnx/savedmodel/tflite with labels and a
model card; `runtime` opens such a file with its own runtime (`predict --model`)."""

from pipeline.export.exporter import FORMATS, ExportResult, export_run  # noqa: F401
from pipeline.export.runtime import ExportedModel, open_model  # noqa: F401
