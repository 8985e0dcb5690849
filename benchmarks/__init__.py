"""torchgate's benchmark suite: `make bench`, or `python -m benchmarks --help`.

One machine, one go, one server under load at a time:

    raw.py       the model itself in-process (TorchScript, ONNX Runtime; batch 1 and max batch)
    servers.py   real TorchServe and `torchgate serve` on the same archives and config.properties
                 (ports rewritten, token authorization off), and their process-tree memory
    machine.py   what the numbers were measured on (CPU, cores, versions)
    report.py    the side-by-side tables, the targets, docs/benchmarks.md
    suite.py     the command line and the order things run in

HTTP load comes from `benchmarks.load` (wrk, closed loop, connections = concurrency).
`metrics_overhead.py` is a separate study (what metrics cost), not part of `make bench`.
"""
