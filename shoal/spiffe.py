"""Workload identities: SPIFFE IDs and the Kubernetes names inside them.

`spiffe://<trust domain>/ns/<namespace>/sa/<service account>`. A namespace
is a DNS-1123 label and a service account a DNS-1123 subdomain, as the
Kubernetes API server requires of them; anything else is not a workload of
this mesh. Standard library only: the model, the xDS server and the CA all
read identities the same way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

SCHEME = "spiffe://"
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL = re.compile(rf"^{_LABEL}\Z")
_DNS_SUBDOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*\Z")
# A trust domain is a host name (SPIFFE ID spec, section 2.1): lower-case
# letters, digits, dots, dashes and underscores.
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+\Z")


class IdentityError(ValueError):
    """Not a workload identity of this mesh, and why."""


def is_dns_label(name: str) -> bool:
    """A namespace name: at most 63 characters, [a-z0-9-], alphanumeric ends."""
    return len(name) <= 63 and _DNS_LABEL.match(name) is not None


def is_dns_subdomain(name: str) -> bool:
    """A service account name: at most 253 characters of dot-separated labels."""
    return len(name) <= 253 and _DNS_SUBDOMAIN.match(name) is not None


def workload_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse(spiffe_id: str) -> tuple[str, str, str]:
    """(trust domain, namespace, service account); IdentityError says why not."""
    rest = spiffe_id.removeprefix(SCHEME)
    parts = rest.split("/")
    if rest == spiffe_id or len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        raise IdentityError(f"{spiffe_id!r} is not a workload identity (spiffe://TD/ns/NS/sa/SA)")
    domain, namespace, account = parts[0], parts[2], parts[4]
    if not _TRUST_DOMAIN.match(domain):
        raise IdentityError(f"{spiffe_id!r}: {domain!r} is not a trust domain")
    if not is_dns_label(namespace):
        raise IdentityError(f"{spiffe_id!r}: {namespace!r} is not a namespace name")
    if not is_dns_subdomain(account):
        raise IdentityError(f"{spiffe_id!r}: {account!r} is not a service account name")
    return domain, namespace, account


def of_certificate(uris: Sequence[str], trust_domain: str) -> str:
    """The one workload identity a client certificate proves, given its URI
    SANs. Exactly one SPIFFE URI, of this trust domain: a certificate with
    none, two, or another domain's proves nothing here (fail closed)."""
    found = [u for u in uris if u.lower().startswith(SCHEME)]
    if not found:
        raise IdentityError("the client certificate carries no SPIFFE ID")
    if len(found) > 1:
        raise IdentityError(f"the client certificate carries {len(found)} SPIFFE IDs, not one")
    domain, _, _ = parse(found[0])
    if domain != trust_domain:
        raise IdentityError(
            f"the client certificate is of trust domain {domain!r}, not {trust_domain!r}"
        )
    return found[0]
