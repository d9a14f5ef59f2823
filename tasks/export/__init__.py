"""Export of registered scikit-learn pipelines to deployable formats (issue 4).

base.py: the exporter interface and the format registry; onnx.py, pmml.py: exporters; parity.py,
latency.py: pure measurements; core.py: one format end to end (no Prefect); manifest.py: the
manifest and the edge bundle; steps.py: the Prefect tasks of flows/export.py. Converters are
imported inside the exporters (fast imports rule): importing this package imports none of them.
"""
