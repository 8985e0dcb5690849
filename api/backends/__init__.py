"""Where inference happens for a model version: implementations of `api.core.types.Backend`.

    archive.py     open a TorchServe model archive (.mar zip, .tar.gz or directory): validate
                   it, extract it safely, read its manifest          -> Archive
    extract.py     the safe extraction itself (path traversal, symlinks, zip bombs)
    workers.py     WorkerBackend: the handler hosted in worker processes (`api.workers`)
    requirements.py  an archive's requirements.txt, installed for its own workers
    torchserve.py  a proxy to a running TorchServe

Nothing here imports torch or handler code: that happens in the worker processes only.
"""

# The models={...} and snapshot key that names a version's backend. Here, so the loader reads
# it without importing the TorchServe proxy (and httpx) for archives.
BACKEND_KEY = "torchgate.backend"
