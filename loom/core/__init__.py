"""The core every layer stands on: typed errors, optional dependencies, ONNX helpers, the
reference engine, paths, progress, YAML schema checks and the version. It imports nothing
from the rest of sparseloom."""
