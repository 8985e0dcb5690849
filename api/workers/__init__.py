"""Worker processes: where handler code runs, isolated from the frontend and from each other.

    frontend (HTTP, gRPC, routing, batching, metrics; never imports torch)
      └─ zygote.py   one process: imports torch once, forks every worker on request
           └─ worker processes, one per model version worker: main.py hosts the archive's
              handler with TorchServe's worker contract (handler.py imports it, context.py
              is the `Context` and metrics store it gets)

    wire.py   frames between the frontend and a worker (pickle 5, buffers out of band)
    pool.py   the frontend's side: starts the zygote, one channel per worker, worker logs

A crash, a hang or an interpreter-lock hog in a handler costs only its own worker's requests:
the frontend's event loop never runs handler code and never waits on it without a deadline.
"""
