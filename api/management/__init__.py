"""TorchServe's management operations, for every transport.

`Management` registers, lists, describes, scales, sets defaults and unregisters, and answers
each with one `Reply` (the HTTP status TorchServe answers with and the JSON body). REST
(`api.rest.management`) and gRPC (`api.rpc.torchserve`) only decode their request into the
argument dataclasses of `api.management.params` and encode the reply, so the two cannot drift
apart; errors are `api.errors`' tree, mapped by its one table.

`params` parses query values as TorchServe 0.12 does: a value that is empty, not a number or
out of range means the parameter's default rather than a 400 (its regression suite relies on
it), and a boolean is true only when it says "true".
"""

from api.management.operations import Management, Reply
from api.management.params import ListArgs, RegisterArgs, ScaleArgs

__all__ = ["ListArgs", "Management", "RegisterArgs", "Reply", "ScaleArgs"]
