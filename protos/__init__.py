"""The Open Inference Protocol: `.proto` sources, generated stubs and tensor conversion.

This package is the only place that knows protobuf classes. Node and router servicers
convert at their edge with `hybridroute.protos.tensors`; everything behind them works
on numpy arrays and plain Python values.
"""
