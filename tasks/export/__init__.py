"""Export of registered scikit-learn pipelines to deployable formats.

base.py: the exporter interface and the format registry; onnx.py, pmml.py, tflite.py (with
tflite_graph.py), coreml.py (with coreml_eval.py): exporters; capability.py: the checks they
share; parity.py, latency.py: pure measurements; core.py: one format end to end (no Prefect);
manifest.py: the manifest and the edge bundle; steps.py: the Prefect tasks of flows/export.py.
Converters are imported inside the exporters: importing this package imports none of them, so
flows that do not export never pay for them.
"""
