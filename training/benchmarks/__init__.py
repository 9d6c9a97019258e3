"""Benchmarks of whole models: training and decoding throughput of FlowHN against its peers (issue 6)."""
