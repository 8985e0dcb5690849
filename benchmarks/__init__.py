"""torchgate's benchmark suite: `make bench`, or `python -m benchmarks --help`.

One machine, one go, one server under load at a time:

    raw.py       the model itself in-process (TorchScript, ONNX Runtime; batch 1 and max batch)
    servers.py   real TorchServe and `torchgate serve` on the same archives and config.properties
                 (ports rewritten, token authorization off), and their process-tree memory
    machine.py   what the numbers were measured on (CPU, cores, versions)
    overload.py  how the excess is refused at c=200 (a short python-engine probe after wrk's run)
    report.py    the side-by-side tables, the targets, docs/benchmarks.md
    preflight.py the tools a run needs, checked up front; SIGTERM/SIGHUP stop it cleanly
    suite.py     the command line and the order things run in

HTTP load comes from `benchmarks.load` (wrk, closed loop, connections = concurrency).
`v2_throughput.py` (KServe v2 REST and gRPC next to TorchServe REST) runs on its own after the
suite (`make bench`) and writes its section into the same report.
`metrics_overhead.py` is a separate study (what metrics cost), not part of `make bench`.
"""
