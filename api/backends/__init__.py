"""Where inference happens for a model version: implementations of `api.core.types.Backend`.

    archive.py   open a TorchServe model archive (.mar zip, .tar.gz or directory): validate it,
                 extract it safely, read its manifest          -> Archive
    extract.py   the safe extraction itself (path traversal, symlinks, zip bombs)
    loader.py    import an archive's handler the way a TorchServe worker does, isolated from
                 other archives' modules of the same name      -> EntryPoint
    context.py   the TorchServe `Context` and metrics store handed to handlers
    local.py     LocalBackend: the handler hosted in-process, one thread per worker

Nothing is imported here, so `api.backends.<proxy>` does not pull in torch.
"""
