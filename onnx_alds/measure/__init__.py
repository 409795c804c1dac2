"""Measurement: everything that runs a model to learn how fast it is.

``inputs`` (seeded feeds), ``timing`` (the one timing primitive every caller
shares: :func:`~onnx_alds.measure.timing.timed_runs`), ``int8`` (the int8
copies that ``--int8`` times, kept by an owned cache), ``profile``
(onnxruntime's profiler: each layer's time inside the whole model),
``latency_table`` (per-layer latency for ``--keep-latency``) and ``speed``
(the speed guard's model).  The package imports the analysis stages below it
(extract, emit, io, ops) and nothing above it: no policy, no pipeline, no API.
"""
