"""The Kubernetes client layer, shared by the registry, the CA and (to come)
the injector: the API server's address and credentials (config), one
session to it (client), its refusals as classes (errors), the shapes of what
goes over the wire (bodies), the shared backoff, Secrets and Leases, and
TokenReview (who a service-account token belongs to).

It knows nothing of the mesh: nothing here imports the model, the
registries or xDS. Code outside imports the package (`from shoal import
kube`) and uses the names below; inside, the modules import one another.
"""

from shoal.kube import bodies
from shoal.kube.backoff import Backoff
from shoal.kube.client import Api, resource_path
from shoal.kube.config import ApiServer, connect
from shoal.kube.errors import (
    ApiError,
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    NotFound,
    ServerError,
    TooManyRequests,
    Unauthorized,
)
from shoal.kube.lease import Lease
from shoal.kube.secrets import read_secret, replace_secret, shared_secret
from shoal.kube.tokenreview import TokenReviews

__all__ = [
    "Api",
    "ApiError",
    "ApiServer",
    "Backoff",
    "Conflict",
    "Forbidden",
    "Gone",
    "Invalid",
    "Lease",
    "NotFound",
    "ServerError",
    "TokenReviews",
    "TooManyRequests",
    "Unauthorized",
    "bodies",
    "connect",
    "read_secret",
    "replace_secret",
    "resource_path",
    "shared_secret",
]
