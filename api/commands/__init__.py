"""The `torchgate` command line's subcommands (`api.cli` dispatches here).

launch.py     `torchgate start|stop` and `torchgate --start ...`: TorchServe's command line
instances.py  one pid file per config under the temp dir, held with flock while serving
listen.py     binds the listening ports before anything is announced (port in use: exit 2)
models.py     `torchgate models ...`: the management API for people (tables) and scripts
"""
