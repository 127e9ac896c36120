"""A faithful in-memory Kubernetes API server, over real HTTP, for tests.

Behaviour follows the Kubernetes "API Concepts" page
(https://kubernetes.io/docs/reference/using-api/api-concepts/), whose sections
the comments cite. Where the page leaves a choice to the server, the emulator
does what kube-apiserver does and says so, because code that passes here must
meet the same edge cases in a cluster: list items without kind/apiVersion, 410
as a watch event inside an HTTP 200, writes that change nothing bumping
nothing, PUT without resourceVersion refused for Leases.

From a synchronous test, or one that points subprocesses at it:

    with running_emulator(bookmark_interval=0.2) as emu:
        emu.create(objects.namespace("demo"))
        kubeconfig = emu.write_kubeconfig(tmp_path / "kubeconfig")

From an async test, in the test's own event loop:

    emu = KubeEmulator()
    await emu.start()
    try:
        ...
    finally:
        await emu.stop()

Service-account tokens ("Managing Service Accounts", TokenRequest and
TokenReview in the API reference): `POST .../serviceaccounts/<sa>/token` signs
an ES256 JWT with kube-apiserver's claims, audience-bound, expiring and bound
to a Pod; `POST /apis/authentication.k8s.io/v1/tokenreviews` checks signature,
expiry (with go-jose's one-minute leeway), audience and that the ServiceAccount
and Pod still exist with the uids in the token. From a test:

    token = emu.token_for_pod("shop", "web-1", audience="shoal", ttl=3600)
    emu.review_token(token, ["shoal"])      # a TokenReview's status
    emu.clock = lambda: time.time() + 7200  # tokens age without sleeping

Mutating admission ("Dynamic Admission Control"): stored
MutatingWebhookConfigurations (defaulted and validated as v1) are called over
HTTPS on CREATE and UPDATE (PUT and PATCH) with AdmissionReview v1: rules,
namespaceSelector, objectSelector, failurePolicy, timeoutSeconds,
sideEffects against dry-run, reinvocationPolicy IfNeeded, JSONPatch responses,
denials, warnings. clientConfig.url is called as written; clientConfig.service
at the address `KubeEmulator(services={(ns, name, port): "host:port"})` or
`emu.map_service()` gives, its certificate checked for <name>.<ns>.svc. Calls
are recorded: `emu.admission_calls()`. In-process writes are admitted too:
`emu.create()` blocks while the emulator's loop calls the webhooks, so from a
test running in that loop, `await emu.acreate()` (`aupdate`, `apatch`).

`?dryRun=All` on create, update, patch and delete runs admission and answers
what would be stored, storing nothing.

Port-forward (`pods/<name>/portforward`, tests/kube/portforward.py): the
real `kubectl port-forward` works, over SPDY/3.1 tunnelled in WebSocket
(kubectl's default) or plain SPDY/3.1 (its fallback). A test says where a
Pod's port goes, "host:port" or a coroutine function that connects (e.g.
`tests.netns.Pod.connector(15000)`, inside the Pod's network namespace):

    emu.map_pod_port("shop", "web", 15000, "127.0.0.1:8080")

As in a cluster, a missing Pod is 404 NotFound; a Pod whose status.phase is
not Running gets kubelet's 404 "pod does not exist" (kubectl checks the
phase itself and does not ask); an unmapped port is refused as the runtime
refuses it, its message on the forward's error stream, which kubectl prints.

Exec (`pods/<name>/exec`, tests/kube/exec.py): the real `kubectl exec`
works over its default v5.channel.k8s.io WebSocket protocol; what runs is
the test's, `emu.map_pod_exec("shop", "web", runner)`.

Events (core/v1) are validated as kube-apiserver validates them: an Event
is in its involved object's namespace ("default" for a cluster-scoped
object), and one with eventTime carries its reporting controller, instance,
action and reason. Their field selectors (involvedObject.*, reason, type)
are what `kubectl describe` and `kubectl get events --field-selector` use.
Not emulated: their TTL (kube-apiserver's --event-ttl, an hour).

The Gateway API's HTTPRoute and GRPCRoute (`gateway.networking.k8s.io/v1`)
are served with their status subresource: a PUT to `.../status` writes the
status only, a PUT to the object everything but.

Not emulated: authorization (every authenticated caller may do anything),
validating webhooks and ValidatingAdmissionPolicy, admission of DELETE and
CONNECT and of subresources, matchPolicy Exact vs Equivalent (there is one
version of each kind), token binding to Secrets and Nodes, server-side apply,
subresources other than serviceaccounts/token, pods/portforward, pods/exec
(WebSocket only) and the Gateway API routes' status (scale, attach, log,
proxy, ...),
finalizers and graceful deletion, Table and Protobuf representations, schema
validation, managedFields, strategic-merge list semantics.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import copy
import datetime
import functools
import hashlib
import importlib.util
import ipaddress
import json
import random
import re
import socket
import ssl
import struct
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiohttp
import jsonpatch
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID

from tests.kube import exec as pod_exec
from tests.kube import portforward

JSON = dict[str, Any]
_T = TypeVar("_T")


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True, slots=True)
class Kind:
    """One resource type served (API Concepts, "Kubernetes API terminology")."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    # kube-apiserver strategy flags: a PUT to a missing object creates it
    # (Leases), a PUT must carry the resourceVersion (Leases, custom resources).
    create_on_update: bool = False
    unconditional_update: bool = True
    # A custom resource: no strategic merge patch, and list items keep their
    # kind/apiVersion (unstructured lists).
    custom: bool = False
    name_rule: Literal["subdomain", "label", "dns1035"] = "subdomain"
    # Field selectors beyond metadata.name and metadata.namespace.
    field_labels: tuple[str, ...] = ()
    # What the resource supports; a create-only kind (TokenReview) is never
    # stored: the server answers the POST and forgets it.
    verbs: tuple[str, ...] = (
        "create",
        "delete",
        "deletecollection",
        "get",
        "list",
        "patch",
        "update",
        "watch",
    )
    # Subresources listed in discovery: (name, kind, group, version, verbs).
    subresources: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = ()
    # Discovery's shortNames and categories, which kubectl resolves
    # (`kubectl get ns`, `kubectl get all`).
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def stored(self) -> bool:
        return "get" in self.verbs

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """How kube-apiserver names the resource in error messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def prefix(self) -> str:
        # API Concepts, "Resource URIs": core resources live under /api and
        # omit the group segment.
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"


KINDS: tuple[Kind, ...] = (
    Kind(
        "",
        "v1",
        "namespaces",
        "Namespace",
        False,
        short_names=("ns",),
        name_rule="label",
        field_labels=("status.phase",),
    ),
    Kind(
        "",
        "v1",
        "services",
        "Service",
        True,
        short_names=("svc",),
        categories=("all",),
        name_rule="dns1035",
        field_labels=("spec.clusterIP", "spec.type"),
    ),
    Kind(
        "",
        "v1",
        "pods",
        "Pod",
        True,
        short_names=("po",),
        categories=("all",),
        field_labels=(
            "spec.nodeName",
            "spec.serviceAccountName",
            "spec.restartPolicy",
            "status.phase",
            "status.podIP",
        ),
        # CONNECT subresources: GET (WebSocket) and POST (SPDY) upgrades.
        subresources=(
            ("portforward", "PodPortForwardOptions", "", "v1", ("create", "get")),
            ("exec", "PodExecOptions", "", "v1", ("create", "get")),
        ),
    ),
    Kind(
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        True,
        short_names=("sa",),
        subresources=(("token", "TokenRequest", "authentication.k8s.io", "v1", ("create",)),),
    ),
    Kind("", "v1", "secrets", "Secret", True, field_labels=("type",)),
    Kind(
        "",
        "v1",
        "events",
        "Event",
        True,
        short_names=("ev",),
        field_labels=(
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "reason",
            "type",
        ),
    ),
    Kind("", "v1", "configmaps", "ConfigMap", True, short_names=("cm",)),
    Kind("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    Kind(
        "coordination.k8s.io",
        "v1",
        "leases",
        "Lease",
        True,
        create_on_update=True,
        unconditional_update=False,
    ),
    Kind(
        "shoal.io",
        "v1alpha1",
        "trafficroutes",
        "TrafficRoute",
        True,
        unconditional_update=False,
        custom=True,
        # As examples/kubernetes/trafficroute-crd.yaml declares them.
        short_names=("tr",),
    ),
    # The Gateway API's routes (its standard-channel CRDs), each with the
    # status subresource its CRD declares.
    *(
        Kind(
            "gateway.networking.k8s.io",
            "v1",
            plural,
            kind,
            True,
            unconditional_update=False,
            custom=True,
            subresources=(("status", kind, "gateway.networking.k8s.io", "v1", ("get", "update")),),
            categories=("gateway-api",),
        )
        for plural, kind in (("httproutes", "HTTPRoute"), ("grpcroutes", "GRPCRoute"))
    ),
    Kind(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        False,
    ),
    # Kubernetes API reference, "TokenReview v1": create only, never stored.
    Kind("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False, verbs=("create",)),
)

# Present in every cluster: code that lists namespaces meets them.
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

SERVER_VERSION: JSON = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-shoal-emulator",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


# --------------------------------------------------------------------------- errors

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

# kube-apiserver's wording, which clients and people grep for.
OPTIMISTIC_LOCK_MESSAGE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def status_object(
    code: int, message: str, reason: str | None = None, details: Mapping[str, Any] | None = None
) -> JSON:
    """A failure `Status`, the body of every error the API returns."""
    body: JSON = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason if reason is not None else _REASONS.get(code, ""),
        "code": code,
    }
    if details:
        body["details"] = dict(details)
    return body


class KubeError(Exception):
    """An API error: what the server answers, as a `Status` object."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        details: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status_object(code, message, reason, details)
        self.headers = dict(headers or {})
        super().__init__(f"{code} {self.status['reason']}: {message}")

    @property
    def code(self) -> int:
        code: int = self.status["code"]
        return code

    @property
    def reason(self) -> str:
        reason: str = self.status["reason"]
        return reason


def _details(kind: Kind, name: str) -> JSON:
    out: JSON = {"name": name, "kind": kind.plural}
    if kind.group:
        out["group"] = kind.group
    return out


def _not_found(kind: Kind, name: str) -> KubeError:
    return KubeError(404, f'{kind.group_resource} "{name}" not found', details=_details(kind, name))


def _conflict(kind: Kind, name: str, why: str) -> KubeError:
    return KubeError(
        409,
        f'Operation cannot be fulfilled on {kind.group_resource} "{name}": {why}',
        details=_details(kind, name),
    )


def _invalid(kind_name: str, name: str, path: str, why: str) -> KubeError:
    message = f"{path}: {why}"
    return KubeError(
        422,
        f'{kind_name} "{name}" is invalid: {message}',
        details={
            "name": name,
            "kind": kind_name,
            "causes": [{"reason": "FieldValueInvalid", "message": why, "field": path}],
        },
    )


def _bad_request(message: str) -> KubeError:
    return KubeError(400, message)


def _expired(message: str) -> KubeError:
    # API Concepts, '"410 Gone" responses': the code is 410, the reason Expired.
    return KubeError(410, message, reason="Expired")


# --------------------------------------------------------------------------- selectors

_NAME_PART = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^(?:[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?/)?{_NAME_PART}$")
_LABEL_VALUE = re.compile(rf"^(?:{_NAME_PART})?$")
_REQ_NOT_EXISTS = re.compile(r"^!\s*(\S+)$")
_REQ_SET = re.compile(r"^(\S+?)\s+(in|notin)\s*\((.*)\)$")
_REQ_COMPARE = re.compile(r"^([^\s=!<>]+)\s*(==|!=|=|>|<)\s*(\S*)$")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One term of a label selector."""

    key: str
    op: Literal["exists", "!", "=", "!=", "in", "notin", ">", "<"]
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            # kube-apiserver: `!=` and `notin` also match objects without the key.
            return not present or value not in self.values
        try:
            number = int(value or "")
        except ValueError:
            return False
        bound = int(self.values[0])
        return number > bound if self.op == ">" else number < bound


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside `in (...)` value sets."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_label_selector(text: str) -> tuple[Requirement, ...]:
    """`a=b,c!=d,e in (f,g),h notin (i),j,!k,l>3` as kube-apiserver parses it."""
    requirements: list[Requirement] = []
    if not text.strip():
        return ()
    for raw in _split_top_level(text):
        term = raw.strip()
        req = _parse_requirement(term)
        if req is None or not _LABEL_KEY.match(req.key):
            raise _bad_request(f"unable to parse requirement: {term!r} in selector {text!r}")
        if req.op in (">", "<"):
            if not re.fullmatch(r"-?\d+", req.values[0]):
                raise _bad_request(f"unable to parse requirement: {term!r}: expected an integer")
        elif not all(_LABEL_VALUE.match(v) for v in req.values):
            raise _bad_request(f"unable to parse requirement: {term!r}: invalid label value")
        requirements.append(req)
    return tuple(requirements)


def _parse_requirement(term: str) -> Requirement | None:
    if m := _REQ_NOT_EXISTS.match(term):
        return Requirement(m.group(1), "!")
    if m := _REQ_SET.match(term):
        values = tuple(v.strip() for v in m.group(3).split(","))
        op: Literal["in", "notin"] = "in" if m.group(2) == "in" else "notin"
        return Requirement(m.group(1), op, values)
    if m := _REQ_COMPARE.match(term):
        symbol = m.group(2)
        compare: Literal["=", "!=", ">", "<"] = "=" if symbol == "==" else symbol  # type: ignore[assignment]
        return Requirement(m.group(1), compare, (m.group(3),))
    if term and not re.search(r"[\s=!<>(),]", term):
        return Requirement(term, "exists")
    return None


def labels_match(selector: Sequence[Requirement], obj: Mapping[str, Any]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(req.matches(labels) for req in selector)


def parse_field_selector(text: str, kind: Kind) -> tuple[tuple[str, str, str], ...]:
    """`metadata.name=x,metadata.namespace!=y`: the fields kube-apiserver indexes."""
    terms: list[tuple[str, str, str]] = []
    allowed = ("metadata.name", "metadata.namespace", *kind.field_labels)
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            continue
        m = re.match(r"^([^=!]+?)\s*(==|!=|=)\s*(.*)$", term)
        if m is None:
            raise _bad_request(f"invalid field selector: {term!r}")
        name, op, value = m.group(1), m.group(2), m.group(3).strip()
        if name not in allowed:
            raise _bad_request(f"field label not supported: {name}")
        terms.append((name, "!=" if op == "!=" else "=", value))
    return tuple(terms)


def _field_value(obj: Mapping[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return str(node).lower()
    return str(node)


def fields_match(selector: Sequence[tuple[str, str, str]], obj: Mapping[str, Any]) -> bool:
    return all((_field_value(obj, name) == value) == (op == "=") for name, op, value in selector)


# --------------------------------------------------------------------------- helpers


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_bool(value: str | None) -> bool:
    # Go's strconv.ParseBool, which the API server uses for query parameters.
    return (value or "").strip() in ("1", "t", "T", "true", "TRUE", "True")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: maps merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NAME_RULES = {
    "subdomain": (
        _DNS_SUBDOMAIN,
        253,
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, "
        "'-' or '.', and must start and end with an alphanumeric character",
    ),
    "label": (
        _DNS_LABEL,
        63,
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or "
        "'-', and must start and end with an alphanumeric character",
    ),
    "dns1035": (
        _DNS_1035,
        63,
        "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start "
        "with an alphabetic character, and end with an alphanumeric character",
    ),
}
# kube-apiserver's generateName suffix alphabet: no vowels, no look-alikes.
_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def _without_type_meta(obj: Mapping[str, Any]) -> JSON:
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _spec_of(obj: Mapping[str, Any]) -> JSON:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


# --------------------------------------------------------------------------- tokens

# The --service-account-issuer most clusters use; also the audience a token
# gets when a TokenRequest names none (kube-apiserver's --api-audiences
# defaults to the issuer).
DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# go-jose's jwt.DefaultLeeway, which kube-apiserver's token validator applies
# to exp, nbf and iat: a token is still accepted up to a minute after exp.
TOKEN_LEEWAY = 60.0
# TokenRequest validation (Kubernetes API reference, "TokenRequest v1").
MIN_TOKEN_SECONDS = 600
MAX_TOKEN_SECONDS = 1 << 32
DEFAULT_TOKEN_SECONDS = 3600
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
CREDENTIAL_ID_EXTRA = "authentication.kubernetes.io/credential-id"
# Who a client with the kubeconfig's token is: kubeadm's admin.conf user.
ADMIN_USER: JSON = {
    "username": "kubernetes-admin",
    "groups": ["kubeadm:cluster-admins", "system:authenticated"],
}


class TokenInvalid(Exception):
    """Why a token does not authenticate (TokenReview status.error)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _go_quote(values: Sequence[str]) -> str:
    """Go's %q of a []string, as kube-apiserver's messages print audiences."""
    return "[" + " ".join(json.dumps(v) for v in values) + "]"


class TokenSigner:
    """Service-account tokens as kube-apiserver signs them with an EC P-256
    --service-account-signing-key-file: compact JWS, ES256, the key id being
    the unpadded base64url SHA-256 of the public key's DER (keyIDFromPublicKey)."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.kid = _b64url(hashlib.sha256(der).digest())

    def sign(self, claims: Mapping[str, Any]) -> str:
        header = {"alg": "ES256", "kid": self.kid}
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        der = self._key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        # JWS (RFC 7518, 3.4): ES256 signatures are R || S, 32 bytes each, not DER.
        r, s = utils.decode_dss_signature(der)
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def verify(self, token: str) -> JSON:
        """The claims of a token this signer made; TokenInvalid otherwise."""
        parts = token.split(".")
        if len(parts) != 3:
            raise TokenInvalid("token lookup failed")
        try:
            header = json.loads(_unb64url(parts[0]))
            claims = json.loads(_unb64url(parts[1]))
            signature = _unb64url(parts[2])
        except (ValueError, UnicodeDecodeError):
            raise TokenInvalid("token lookup failed") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise TokenInvalid("token lookup failed")
        if header.get("alg") != "ES256" or len(signature) != 64:
            raise TokenInvalid("square/go-jose: error in cryptographic primitive")
        der = utils.encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            self._key.public_key().verify(
                der, f"{parts[0]}.{parts[1]}".encode(), ec.ECDSA(hashes.SHA256())
            )
        except InvalidSignature:
            raise TokenInvalid("square/go-jose: error in cryptographic primitive") from None
        return claims

    def jwks(self) -> JSON:
        """The JSON Web Key Set kube-apiserver serves at /openid/v1/jwks."""
        numbers = self._key.public_key().public_numbers()
        return {
            "keys": [
                {
                    "use": "sig",
                    "kty": "EC",
                    "kid": self.kid,
                    "crv": "P-256",
                    "alg": "ES256",
                    "x": _b64url(numbers.x.to_bytes(32, "big")),
                    "y": _b64url(numbers.y.to_bytes(32, "big")),
                }
            ]
        }


# --------------------------------------------------------------------------- admission

# "Dynamic Admission Control"
# (https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/),
# whose sections the admission comments cite.
WEBHOOK_CONFIGURATION = "MutatingWebhookConfiguration.admissionregistration.k8s.io"
_SIDE_EFFECTS_V1 = ("None", "NoneOnDryRun")
_OPERATIONS = ("CREATE", "UPDATE", "DELETE", "CONNECT", "*")
# kube-apiserver's GuaranteedUpdate: how often an update whose object changed
# while webhooks were called is recomputed (and admitted again).
_ADMISSION_RETRIES = 5
# Objects that are never sent to webhooks, so that a broken webhook cannot
# lock the cluster out of fixing it ("Matching requests": "admission webhooks
# are not called for ... ValidatingWebhookConfiguration and
# MutatingWebhookConfiguration objects").
_NEVER_ADMITTED = ("admissionregistration.k8s.io",)


@dataclass(slots=True)
class AdmissionCall:
    """One call of a mutating webhook, as the emulator made it."""

    configuration: str
    webhook: str
    url: str  # as kube-apiserver names it in errors (https://svc.ns.svc:443/path?timeout=10s)
    operation: str  # CREATE UPDATE
    resource: str  # plural
    namespace: str | None
    name: str
    dry_run: bool
    round: int  # 1, or 2 for a reinvocation (reinvocationPolicy: IfNeeded)
    request: JSON  # the AdmissionReview sent
    time: float  # time.monotonic() when sent
    response: JSON | None = None  # the AdmissionReview answered, if any
    allowed: bool | None = None
    patched: bool = False  # the patch changed the object
    error: str | None = None  # why the call failed (failurePolicy decides what follows)
    duration: float | None = None


@dataclass(frozen=True, slots=True)
class _Hook:
    configuration: str
    webhook: JSON

    @property
    def name(self) -> str:
        return str(self.webhook["name"])


class _CallFailed(Exception):
    """A webhook could not be called, or answered nonsense: failurePolicy applies."""


def selector_requirements(selector: Any) -> tuple[Requirement, ...] | None:
    """A metav1.LabelSelector as requirements; None if it is malformed. An
    empty selector matches everything."""
    if selector is None:
        return ()
    if not isinstance(selector, Mapping):
        return None
    out: list[Requirement] = []
    for key, value in (selector.get("matchLabels") or {}).items():
        out.append(Requirement(str(key), "=", (str(value),)))
    operators: dict[str, Literal["in", "notin", "exists", "!"]] = {
        "In": "in",
        "NotIn": "notin",
        "Exists": "exists",
        "DoesNotExist": "!",
    }
    for expression in selector.get("matchExpressions") or []:
        if not isinstance(expression, Mapping) or expression.get("operator") not in operators:
            return None
        op = operators[expression["operator"]]
        values = tuple(str(v) for v in expression.get("values") or [])
        if (op in ("in", "notin")) != bool(values):
            return None
        out.append(Requirement(str(expression.get("key")), op, values))
    return tuple(out)


def _rule_matches(
    rule: Mapping[str, Any], operation: str, kind: Kind, subresource: str | None, cluster: bool
) -> bool:
    """A RuleWithOperations against a request ("Matching requests: rules")."""

    def has(field: str, value: str) -> bool:
        given = rule.get(field) or []
        return "*" in given or value in given

    if not (has("operations", operation) and has("apiGroups", kind.group)):
        return False
    if not has("apiVersions", kind.version):
        return False
    scope = rule.get("scope") or "*"
    if (scope == "Cluster" and not cluster) or (scope == "Namespaced" and cluster):
        return False
    for resource in rule.get("resources") or []:
        # "*" is every resource, "pods/*" pods and its subresources, "*/*" all.
        res, _, sub = str(resource).partition("/")
        if res in ("*", kind.plural) and sub in ("*", subresource or ""):
            return True
    return False


def _default_webhooks(obj: JSON) -> None:
    """kube-apiserver's defaults for admissionregistration.k8s.io/v1."""
    for hook in obj.get("webhooks") or []:
        if not isinstance(hook, dict):
            continue
        hook.setdefault("failurePolicy", "Fail")
        hook.setdefault("matchPolicy", "Equivalent")
        hook.setdefault("namespaceSelector", {})
        hook.setdefault("objectSelector", {})
        hook.setdefault("timeoutSeconds", 10)
        hook.setdefault("reinvocationPolicy", "Never")
        service = (hook.get("clientConfig") or {}).get("service")
        if isinstance(service, dict):
            service.setdefault("port", 443)
        for rule in hook.get("rules") or []:
            if isinstance(rule, dict):
                rule.setdefault("scope", "*")


def _webhook_problem(obj: JSON, *, strict_side_effects: bool) -> tuple[str, str] | None:
    """The first (field, why) kube-apiserver's validation finds, if any."""
    hooks = obj.get("webhooks") or []
    if not isinstance(hooks, list):
        return ("webhooks", "Invalid value: must be a list")
    seen: set[str] = set()
    for i, hook in enumerate(hooks):
        at = f"webhooks[{i}]"
        if not isinstance(hook, dict):
            return (at, "Invalid value: must be an object")
        name = hook.get("name")
        if not isinstance(name, str) or not _DNS_SUBDOMAIN.match(name):
            return (f"{at}.name", f'Invalid value: "{name}": must be a DNS subdomain')
        if name.count(".") < 2:
            return (
                f"{at}.name",
                f'Invalid value: "{name}": should be a domain with at least three segments '
                "separated by dots",
            )
        if name in seen:
            return (f"{at}.name", f'Duplicate value: "{name}"')
        seen.add(name)
        versions = hook.get("admissionReviewVersions")
        if not versions:
            return (f"{at}.admissionReviewVersions", "Required value: must specify one of v1")
        if "v1" not in versions:
            return (
                f"{at}.admissionReviewVersions",
                f"Unsupported value: {versions}: the emulator speaks AdmissionReview v1 only",
            )
        side_effects = hook.get("sideEffects")
        if side_effects is None:
            return (f"{at}.sideEffects", "Required value: must specify one of None, NoneOnDryRun")
        if strict_side_effects and side_effects not in _SIDE_EFFECTS_V1:
            return (
                f"{at}.sideEffects",
                f'Unsupported value: "{side_effects}": supported values: "None", "NoneOnDryRun"',
            )
        checks: list[tuple[str, Any, tuple[Any, ...]]] = [
            ("failurePolicy", hook["failurePolicy"], ("Fail", "Ignore")),
            ("matchPolicy", hook["matchPolicy"], ("Equivalent", "Exact")),
            ("reinvocationPolicy", hook["reinvocationPolicy"], ("Never", "IfNeeded")),
        ]
        for field, value, allowed in checks:
            if value not in allowed:
                return (f"{at}.{field}", f'Unsupported value: "{value}"')
        timeout = hook["timeoutSeconds"]
        if not isinstance(timeout, int) or not 1 <= timeout <= 30:
            return (
                f"{at}.timeoutSeconds",
                f"Invalid value: {timeout}: the timeout value must be between 1 and 30 seconds",
            )
        config = hook.get("clientConfig")
        if not isinstance(config, dict) or (config.get("url") is None) == (
            config.get("service") is None
        ):
            return (
                f"{at}.clientConfig",
                "Required value: exactly one of url or service is required",
            )
        url = config.get("url")
        if url is not None and not str(url).startswith("https://"):
            return (
                f"{at}.clientConfig.url",
                "Invalid value: 'https' is the only allowed URL scheme",
            )
        service = config.get("service")
        if service is not None and not (
            isinstance(service, dict) and service.get("name") and service.get("namespace")
        ):
            return (f"{at}.clientConfig.service", "Required value: namespace and name")
        bundle = config.get("caBundle")
        if bundle is not None:
            try:
                base64.b64decode(str(bundle), validate=True)
            except ValueError:
                return (f"{at}.clientConfig.caBundle", "Invalid value: not base64")
        for j, rule in enumerate(hook.get("rules") or []):
            ops = rule.get("operations") if isinstance(rule, dict) else None
            if not ops or any(op not in _OPERATIONS for op in ops):
                return (f"{at}.rules[{j}].operations", f"Unsupported value: {ops}")
            if rule.get("scope") not in ("*", "Cluster", "Namespaced"):
                return (f"{at}.rules[{j}].scope", f'Unsupported value: "{rule.get("scope")}"')
        for field in ("namespaceSelector", "objectSelector"):
            if selector_requirements(hook[field]) is None:
                return (f"{at}.{field}", "Invalid value: not a label selector")
    return None


# --------------------------------------------------------------------------- events

# pkg/apis/core/validation/events.go: the limits of a "new" Event (one with
# eventTime), which core/v1 applies to those only.
EVENT_NOTE_LIMIT = 1024
EVENT_REASON_LIMIT = 128
EVENT_ACTION_LIMIT = 128
EVENT_REPORTING_INSTANCE_LIMIT = 128


def _event_problem(obj: JSON) -> tuple[str, str] | None:
    """The first (field, why) kube-apiserver's core/v1 Event validation
    (legacyValidateEvent, as ValidateEventCreate and ValidateEventUpdate run
    it for v1) finds, if any.

    An Event without eventTime (the "old" shape, client-go's legacy
    recorder) only has to agree on its namespace: the involved object's, or
    for a cluster-scoped object (no involvedObject.namespace) "default" or
    none. One with eventTime needs its reporting controller and instance,
    action and reason, within their limits."""
    meta = obj["metadata"]
    namespace = meta.get("namespace") or ""
    involved = obj.get("involvedObject")
    involved = involved if isinstance(involved, dict) else {}
    involved_ns = involved.get("namespace") or ""
    mismatch = (
        "involvedObject.namespace",
        f'Invalid value: "{involved_ns}": does not match event.namespace',
    )
    if not obj.get("eventTime"):
        if involved_ns:
            if namespace != involved_ns:
                return mismatch
        elif namespace not in ("", "default"):
            return mismatch
        return None
    if not involved_ns and namespace not in ("default", "kube-system"):
        return mismatch
    controller = obj.get("reportingComponent") or ""
    if not controller:
        return ("reportingComponent", "Required value")
    instance = obj.get("reportingInstance") or ""
    if not instance:
        return ("reportingInstance", "Required value")
    if len(instance) > EVENT_REPORTING_INSTANCE_LIMIT:
        return (
            "reportingInstance",
            f'Invalid value: "": can have at most {EVENT_REPORTING_INSTANCE_LIMIT} characters',
        )
    for field, limit in (("action", EVENT_ACTION_LIMIT), ("reason", EVENT_REASON_LIMIT)):
        value = obj.get(field) or ""
        if not value:
            return (field, "Required value")
        if len(value) > limit:
            return (field, f'Invalid value: "": can have at most {limit} characters')
    if len(obj.get("message") or "") > EVENT_NOTE_LIMIT:
        return ("message", f'Invalid value: "": can have at most {EVENT_NOTE_LIMIT} characters')
    return None


def _status_of_denial(webhook: str, status: Any) -> JSON:
    """webhookerrors.ToStatusErr: what a client sees when a webhook says no."""
    given = dict(status) if isinstance(status, Mapping) else {}
    denied = f'admission webhook "{webhook}" denied the request'
    raw_code = given.get("code")
    code = raw_code if isinstance(raw_code, int) else 0
    if code < 400:
        code = 403
    if given.get("message"):
        message = f"{denied}: {given['message']}"
    elif given.get("reason"):
        message = f"{denied}: {given['reason']}"
    else:
        message = f"{denied} without explanation"
    body = status_object(code, message, str(given.get("reason") or ""))
    if isinstance(given.get("details"), Mapping):
        body["details"] = dict(given["details"])
    return body


# --------------------------------------------------------------------------- schemas

# The built-in kinds' schemas, from the Kubernetes release whose version the
# emulator reports (the OpenAPI of kube-apiserver, as kubernetes-validate
# ships it, "strict": closed objects). They carry what strategic merge patch
# needs (x-kubernetes-patch-strategy, -merge-key) and the fields each kind has.
SCHEMA_RELEASE = "v1.31.0-local-strict"
_FIELD_VALIDATION = ("Strict", "Warn", "Ignore")


@functools.cache
def builtin_schemas() -> Mapping[str, JSON]:
    """Definitions by name (io.k8s.api.core.v1.Pod, ...); read once, on first use."""
    spec = importlib.util.find_spec("kubernetes_validate")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("kubernetes-validate (a dev dependency) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / "kubernetes-json-schema" / SCHEMA_RELEASE / "_definitions.json"
    definitions: JSON = json.loads(path.read_text())["$defs"]
    return definitions


def schema_name(kind: Kind) -> str:
    """io.k8s.api.<group's first label, or core>.<version>.<Kind>."""
    group = kind.group.split(".")[0] if kind.group else "core"
    return f"io.k8s.api.{group}.{kind.version}.{kind.kind}"


def _resolve(schema: Any) -> JSON:
    while isinstance(schema, Mapping) and "$ref" in schema:
        schema = builtin_schemas().get(str(schema["$ref"]).rsplit("/", 1)[-1], {})
    return dict(schema) if isinstance(schema, Mapping) else {}


def unknown_fields(obj: Any, schema: Any, path: str = "", *, prune: bool = True) -> list[str]:
    """Fields the schema does not declare ("Field validation", API Concepts),
    as kube-apiserver names them (spec.containers[0].portz); removed from
    `obj` with prune, as decoding into the Go types drops them."""
    found: list[str] = []
    resolved = _resolve(schema)
    if isinstance(obj, dict):
        properties = resolved.get("properties")
        extra = resolved.get("additionalProperties")
        for key in list(obj):
            at = f"{path}.{key}" if path else key
            if isinstance(properties, Mapping) and key in properties:
                found += unknown_fields(obj[key], properties[key], at, prune=prune)
            elif isinstance(extra, Mapping):
                found += unknown_fields(obj[key], extra, at, prune=prune)
            elif properties is not None and not resolved.get(
                "x-kubernetes-preserve-unknown-fields"
            ):
                found.append(at)
                if prune:
                    del obj[key]
    elif isinstance(obj, list) and "items" in resolved:
        for i, item in enumerate(obj):
            found += unknown_fields(item, resolved["items"], f"{path}[{i}]", prune=prune)
    return found


def strategic_merge_patch(original: Any, patch: Any, schema: Any) -> Any:
    """Strategic merge patch ("Update API Objects in Place Using kubectl
    patch"; apimachinery's strategicpatch): maps merge as in a merge patch,
    lists whose schema says x-kubernetes-patch-strategy "merge" merge by
    x-kubernetes-patch-merge-key (primitive lists: union), others are
    replaced; the directives $patch (replace, delete, merge), $retainKeys,
    $setElementOrder/<list> and $deleteFromPrimitiveList/<list> apply."""
    resolved = _resolve(schema)
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    result = dict(original) if isinstance(original, dict) else {}
    properties = resolved.get("properties") or {}
    extra = resolved.get("additionalProperties")
    orders: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = list(value or [])
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(result.get(field), list):
                result[field] = [v for v in result[field] if v not in (value or [])]
            continue
        field_schema = _resolve(
            properties.get(key) if key in properties else (extra if isinstance(extra, dict) else {})
        )
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _merge_list(result.get(key), value, field_schema)
        elif isinstance(value, dict):
            if value.get("$patch") == "delete":
                result.pop(key, None)
            else:
                result[key] = strategic_merge_patch(result.get(key), value, field_schema)
        else:
            result[key] = copy.deepcopy(value)
    for field, order in orders.items():
        if isinstance(result.get(field), list):
            key = _resolve(properties.get(field)).get("x-kubernetes-patch-merge-key")
            result[field] = _ordered(result[field], order, key)
    if isinstance(patch.get("$retainKeys"), list):
        keep = set(patch["$retainKeys"])
        result = {k: v for k, v in result.items() if k in keep}
    return result


def _merge_list(original: Any, patch: list[Any], schema: JSON) -> list[Any]:
    strategy = str(schema.get("x-kubernetes-patch-strategy") or "").split(",")
    if "merge" not in strategy or not isinstance(original, list):
        return [
            {k: v for k, v in item.items() if k != "$patch"} if isinstance(item, dict) else item
            for item in copy.deepcopy(patch)
            if not (isinstance(item, dict) and item.get("$patch") == "delete")
        ]
    key = schema.get("x-kubernetes-patch-merge-key")
    if key is None:
        # A merged primitive list is a set union, the original order first.
        return list(original) + [v for v in patch if v not in original]
    merged = [copy.deepcopy(item) for item in original]
    for item in patch:
        if not isinstance(item, dict):
            continue
        at = next(
            (
                i
                for i, o in enumerate(merged)
                if isinstance(o, dict) and o.get(key) == item.get(key)
            ),
            None,
        )
        if item.get("$patch") == "delete":
            if at is not None:
                del merged[at]
        elif at is None:
            merged.append({k: v for k, v in item.items() if k != "$patch"})
        else:
            merged[at] = strategic_merge_patch(merged[at], item, schema.get("items"))
    return merged


def _ordered(items: list[Any], order: list[Any], key: str | None) -> list[Any]:
    """$setElementOrder: the patch's order first, items it does not name after."""

    def ident(item: Any) -> Any:
        return item.get(key) if key is not None and isinstance(item, dict) else item

    wanted = [ident(o) for o in order]
    named = [i for i in items if ident(i) in wanted]
    named.sort(key=lambda i: wanted.index(ident(i)))
    return named + [i for i in items if ident(i) not in wanted]


def _serving_tls(host: str) -> tuple[bytes, ssl.SSLContext]:
    """A CA (its PEM) and a server context whose certificate it signed, for
    `host` (and localhost), valid for a day."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube emulator CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # ssl loads a key from a file only: a private directory, gone at once.
    with tempfile.TemporaryDirectory() as folder:
        chain, private = Path(folder) / "tls.crt", Path(folder) / "tls.key"
        chain.write_bytes(cert.public_bytes(pem))
        private.write_bytes(key_pem)
        context.load_cert_chain(chain, private)
    return ca.public_bytes(pem), context


# --------------------------------------------------------------------------- records


@dataclass(slots=True)
class RequestRecord:
    """One HTTP request the emulator saw; `time` is `time.monotonic()` at arrival."""

    time: float
    method: str
    path: str
    query: dict[str, str]
    verb: str = "unknown"  # get list watch create update patch delete deletecollection discovery
    resource: str | None = None  # plural
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None
    user: str | None = None  # the caller's username, once authenticated
    content_type: str | None = None  # of the body (a PATCH's says its patch type)
    status: int | None = None  # 0: the connection was reset by a fault
    duration: float | None = None
    fault: bool = False  # answered by fail_next()/reset_next()


@dataclass(slots=True)
class _Fault:
    remaining: int
    status: int
    resource: str | None
    verb: str | None
    message: str
    retry_after: int | None
    reset: bool


@dataclass(slots=True)
class _Change:
    """One write, kept for watches that resume and for consistent paged lists."""

    rv: int
    type: str  # ADDED MODIFIED DELETED
    kind: Kind
    key: tuple[str, str]
    obj: JSON
    prev: JSON | None


class _Watcher:
    """One open watch: the store fills its queue, the HTTP handler drains it."""

    def __init__(self, kind: Kind, loop: asyncio.AbstractEventLoop) -> None:
        self.kind = kind
        self.loop = loop
        self.queue: deque[_Change] = deque()
        self.wake = asyncio.Event()
        self.dead = False
        self.transport: asyncio.Transport | None = None

    def poke(self) -> None:
        """Wake the handler; safe from any thread, and after the loop closed."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.wake.set)

    def kill(self) -> None:
        self.dead = True
        if self.transport is not None:
            self.transport.abort()
        self.poke()


@dataclass(slots=True)
class _Route:
    verb: str
    kind: Kind
    namespace: str | None  # None: all namespaces, or a cluster-scoped kind
    name: str | None
    subresource: str | None = None


class _Dropper(asyncio.Protocol):
    """While paused in "reset" mode: accept, count, and reset every connection."""

    def __init__(self, emulator: KubeEmulator) -> None:
        self._emulator = emulator

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._emulator.dropped_connections += 1
        self._emulator.dropped_at.append(time.monotonic())
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: the close sends RST, as a crashed server's host would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        assert isinstance(transport, asyncio.Transport)
        transport.abort()


# --------------------------------------------------------------------------- emulator


# The Content-Type of each kind of patch (API Concepts, "Patch").
PATCH_CONTENT_TYPES = {
    "merge": "application/merge-patch+json",
    "strategic": "application/strategic-merge-patch+json",
    "json": "application/json-patch+json",
}


class KubeEmulator:
    """An in-memory kube-apiserver on 127.0.0.1 at a port picked at start.

    State (objects, the resourceVersion counter, the event history) survives
    `pause()`/`resume()`. Every method that reads or writes state is
    thread-safe and may be called from any thread, also while paused.
    """

    def __init__(
        self,
        *,
        kinds: Iterable[Kind] = KINDS,
        history_limit: int = 1000,
        bookmark_interval: float = 0.5,
        watch_timeout: float | None = None,
        first_resource_version: int = 100,
        system_namespaces: Sequence[str] = SYSTEM_NAMESPACES,
        require_namespace: bool = True,
        defaulting: bool = True,
        too_large_wait: float = 1.0,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        issuer: str = DEFAULT_ISSUER,
        clock: Callable[[], float] = time.time,
        services: Mapping[tuple[str, str, int], str] | None = None,
        user: Mapping[str, Any] | None = None,
        validate_webhooks: bool = True,
        tls: bool = False,
    ) -> None:
        """
        token: if set, every API request must carry `Authorization: Bearer
            <token>` (the scheme in any case, as RFC 7235 allows) or a
            service-account token this emulator signed; others get 401
            Unauthorized, as kube-apiserver answers an unauthenticated client
            ("Authenticating", Kubernetes docs).
        issuer: the service-account token issuer (iss), and the audience of
            tokens requested without one.
        clock: seconds since the epoch, for service-account tokens (iat, exp,
            and TokenReview's expiry check); a test may replace `emu.clock`
            to age tokens without sleeping.
        services: where a webhook's clientConfig.service is, as
            {(namespace, name, port): "host:port"} (kube-apiserver would
            resolve the Service); the server certificate is still checked for
            "<name>.<namespace>.svc", as kube-apiserver checks it.
        user: the userInfo of requests with the kubeconfig's token (in
            AdmissionReviews); default: kubeadm's kubernetes-admin.
        tls: serve HTTPS with a certificate for 127.0.0.1 from a CA of its
            own (`ca_pem`, written into the kubeconfig). kubectl sends a
            bearer token over HTTPS only: with `token`, kubectl needs tls.
        validate_webhooks: refuse MutatingWebhookConfigurations that
            admissionregistration.k8s.io/v1 validation refuses. False stores
            what it is given, as a cluster keeps configurations written
            through v1beta1 (sideEffects Unknown or Some, for instance).
        history_limit: writes kept for watch resumption and paged lists; an older
            resourceVersion gets 410 Expired (etcd compaction).
        bookmark_interval: seconds between BOOKMARK events on watches that allow them.
        watch_timeout: how long a watch without timeoutSeconds lasts (kube-apiserver:
            a random 30-60 min); None: until the client, a fault or stop() ends it.
        require_namespace: creating in a missing namespace is 404, as the
            NamespaceLifecycle admission plugin answers.
        defaulting: fill what kube-apiserver fills (Service clusterIP, ports'
            protocol and targetPort; Namespace phase and name label).
        too_large_wait: how long a get/list for a future resourceVersion waits
            before 504 "Too large resource version".
        """
        self.token = token
        self.issuer = issuer
        self.clock = clock
        self._signer = TokenSigner()
        self.services: dict[tuple[str, str, int], str] = dict(services or {})
        self._pod_ports: dict[tuple[str, str, int], portforward.Target] = {}
        self._pod_execs: dict[tuple[str, str], pod_exec.Runner] = {}
        self.admin_user: JSON = copy.deepcopy(dict(user or ADMIN_USER))
        self._validate_webhooks = validate_webhooks
        self.ca_pem: bytes | None = None
        self._server_tls: ssl.SSLContext | None = None
        if tls:
            self.ca_pem, self._server_tls = _serving_tls(host)
        self._admission_calls: list[AdmissionCall] = []
        self._webhook_http: aiohttp.ClientSession | None = None  # made on first use
        self._ssl_contexts: dict[str, ssl.SSLContext] = {}
        self._lock = threading.RLock()
        self._kinds = tuple(kinds)
        self._by_name: dict[str, Kind] = {}
        self._by_type: dict[tuple[str, str], Kind] = {}
        self._by_gv: dict[tuple[str, str], dict[str, Kind]] = {}
        for kind in self._kinds:
            for alias in (kind.plural, kind.kind, kind.kind.lower(), kind.group_resource):
                self._by_name[alias] = kind
            self._by_type[(kind.api_version, kind.kind)] = kind
            self._by_gv.setdefault((kind.group, kind.version), {})[kind.plural] = kind
        self._namespaces = self._by_type.get(("v1", "Namespace"))
        self._objects: dict[Kind, dict[tuple[str, str], JSON]] = {k: {} for k in self._kinds}
        self._history: deque[_Change] = deque()
        self._history_limit = history_limit
        self._rv = first_resource_version
        self._compacted = first_resource_version
        self._watchers: set[_Watcher] = set()
        self._next_ip = 100
        self._require_namespace = require_namespace
        self._defaulting = defaulting
        self.bookmark_interval = bookmark_interval
        self.watch_timeout = watch_timeout
        self.too_large_wait = too_large_wait

        self._records: list[RequestRecord] = []
        self._faults: list[_Fault] = []
        self.dropped_connections = 0
        # When each was dropped (time.monotonic()), to check a retry schedule.
        self.dropped_at: list[float] = []

        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._reserved: socket.socket | None = None
        self._drop_server: asyncio.Server | None = None
        self._paused = False

        for name in system_namespaces:
            if self._namespaces is not None:
                self._insert(self._namespaces, ("", name), {"metadata": {"name": name}})

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        scheme = "https" if self._server_tls is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def paused(self) -> bool:
        return self._paused

    async def start(self) -> None:
        """Listen on a free port (or the one given) in the running event loop."""
        self._loop = asyncio.get_running_loop()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        sock = self._bind()
        self._port = sock.getsockname()[1]
        self._site = web.SockSite(self._runner, sock, ssl_context=self._server_tls)
        await self._site.start()

    async def stop(self) -> None:
        """Close every connection and the port; state is kept but unreachable."""
        if self._webhook_http is not None:
            await self._webhook_http.close()
            self._webhook_http = None
        self._kill_connections()
        if self._drop_server is not None:
            self._drop_server.close()
            self._drop_server = None
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._site = None

    async def apause(self, *, reset: bool = False) -> None:
        """The API server goes down: open connections (watches too) are cut, and
        new ones are refused (ECONNREFUSED) until `aresume()`. With reset=True
        connections are accepted and reset instead, and counted in
        `dropped_connections`, so a test can measure a client's retry rate."""
        if self._paused or self._runner is None:
            return
        self._paused = True
        if self._site is not None:
            await self._site.stop()
            self._site = None
        self._kill_connections()
        # Keep the port bound (not listening) so nothing else takes it meanwhile.
        sock = self._bind()
        if reset:
            loop = asyncio.get_running_loop()
            self._drop_server = await loop.create_server(lambda: _Dropper(self), sock=sock)
        else:
            self._reserved = sock

    async def aresume(self) -> None:
        """Listen again, on the same port, with all state as it was."""
        if not self._paused or self._runner is None:
            return
        if self._drop_server is not None:
            self._drop_server.close()
            await self._drop_server.wait_closed()
            self._drop_server = None
            sock = self._bind()
        else:
            assert self._reserved is not None
            sock, self._reserved = self._reserved, None
        self._site = web.SockSite(self._runner, sock, ssl_context=self._server_tls)
        await self._site.start()
        self._paused = False

    def pause(self, *, reset: bool = False) -> None:
        """`apause()` from a thread other than the emulator's event loop."""
        self._run(self.apause(reset=reset))

    def resume(self) -> None:
        """`aresume()` from a thread other than the emulator's event loop."""
        self._run(self.aresume())

    def close_watches(self) -> int:
        """Cut every open watch connection abruptly (no final chunk), as a load
        balancer or a crashing API server would; the server stays up. Returns
        how many were cut. Callable from any thread."""
        with self._lock:
            watchers = list(self._watchers)

        def kill_all() -> None:
            for watcher in watchers:
                watcher.kill()

        if self._on_loop_thread():
            kill_all()
        elif self._loop is not None:
            self._run(_call(kill_all))
        return len(watchers)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        sock.setblocking(False)
        return sock

    def _kill_connections(self) -> None:
        with self._lock:
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher.kill()
        server = self._runner.server if self._runner is not None else None
        for handler in server.connections if server is not None else ():
            if handler.transport is not None:
                handler.transport.abort()

    def _on_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the emulator is not started")
        if self._on_loop_thread():
            coro.close()
            raise RuntimeError("on the emulator's own event loop: await the a-prefixed method")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # ------------------------------------------------------------------ test API

    def kind(self, resource: str) -> Kind:
        """A Kind by plural ("services"), kind ("Service") or "plural.group"."""
        try:
            return self._by_name[resource]
        except KeyError:
            raise ValueError(f"unknown resource {resource!r}") from None

    def kind_of(self, obj: Mapping[str, Any]) -> Kind:
        try:
            return self._by_type[(obj.get("apiVersion", ""), obj.get("kind", ""))]
        except KeyError:
            raise ValueError(
                f"unknown kind {obj.get('apiVersion')!r} {obj.get('kind')!r}"
            ) from None

    @property
    def resource_version(self) -> str:
        """The latest resourceVersion, as a list made now would carry."""
        with self._lock:
            return str(self._rv)

    def create(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> JSON:
        """POST, as a client would (same checks, same watch event, same
        admission webhooks). When a webhook must be called, this blocks until
        the emulator's loop has called it: from the emulator's own loop,
        `await acreate()` instead."""
        kind = self.kind_of(obj)
        namespace = self._namespace_of(kind, obj)
        if self._admitted("CREATE", kind, namespace, obj, None):
            return self._run(self.acreate(obj, dry_run=dry_run))
        return copy.deepcopy(self._create(kind, namespace, obj, dry_run=dry_run))

    async def acreate(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> JSON:
        """`create()`, awaitable, for tests in the emulator's event loop."""
        kind = self.kind_of(obj)
        namespace = self._namespace_of(kind, obj)
        result = await self._acreate(kind, namespace, obj, dry_run=dry_run)
        return copy.deepcopy(result)

    def update(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> JSON:
        """PUT. With metadata.resourceVersion it is checked (409 on a stale one);
        without it the update is unconditional, whatever the kind."""
        kind = self.kind_of(obj)
        namespace = self._namespace_of(kind, obj)
        name = obj.get("metadata", {}).get("name", "")
        with self._lock:
            candidate, current = self._update_candidate(kind, namespace, name, obj, force=True)
            hooks = self._admitted("UPDATE", kind, namespace, candidate, current)
            if not hooks:
                result, _ = self._update(kind, namespace, name, obj, force=True, dry_run=dry_run)
                return copy.deepcopy(result)
        return self._run(self.aupdate(obj, dry_run=dry_run))

    async def aupdate(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> JSON:
        """`update()`, awaitable."""
        kind = self.kind_of(obj)
        name = obj.get("metadata", {}).get("name", "")
        namespace = self._namespace_of(kind, obj)
        result, _ = await self._aupdate(kind, namespace, name, obj, force=True, dry_run=dry_run)
        return copy.deepcopy(result)

    def apply(self, obj: Mapping[str, Any]) -> JSON:
        """Create, or replace unconditionally: a seeding shortcut, not server-side apply."""
        kind = self.kind_of(obj)
        body = copy.deepcopy(dict(obj))
        body.setdefault("metadata", {}).pop("resourceVersion", None)
        namespace = self._namespace_of(kind, body)
        with self._lock:
            if (namespace or "", body["metadata"].get("name", "")) in self._objects[kind]:
                return self.update(body)
            return copy.deepcopy(self._create(kind, namespace, body))

    def patch(
        self,
        resource: str,
        name: str,
        patch: Any,
        *,
        namespace: str = "",
        patch_type: Literal["merge", "strategic", "json"] = "merge",
    ) -> JSON:
        kind = self.kind(resource)
        content_type = PATCH_CONTENT_TYPES[patch_type]
        ns = self._default_namespace(kind, namespace)
        with self._lock:
            candidate, current = self._patch_candidate(kind, ns, name, content_type, patch)
            if not self._admitted("UPDATE", kind, ns, candidate, current):
                return copy.deepcopy(self._patch(kind, ns, name, content_type, patch))
        return self._run(
            self.apatch(resource, name, patch, namespace=namespace, patch_type=patch_type)
        )

    async def apatch(
        self,
        resource: str,
        name: str,
        patch: Any,
        *,
        namespace: str = "",
        patch_type: Literal["merge", "strategic", "json"] = "merge",
    ) -> JSON:
        """`patch()`, awaitable."""
        kind = self.kind(resource)
        content_type = PATCH_CONTENT_TYPES[patch_type]
        ns = self._default_namespace(kind, namespace)
        return copy.deepcopy(await self._apatch(kind, ns, name, content_type, patch))

    def delete(self, resource: str, name: str, *, namespace: str = "") -> JSON:
        kind = self.kind(resource)
        return copy.deepcopy(self._delete(kind, self._default_namespace(kind, namespace), name, {}))

    def get(self, resource: str, name: str, *, namespace: str = "") -> JSON | None:
        kind = self.kind(resource)
        key = (self._default_namespace(kind, namespace) or "", name)
        with self._lock:
            obj = self._objects[kind].get(key)
            return copy.deepcopy(obj) if obj is not None else None

    def list(
        self,
        resource: str,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[JSON]:
        """Current objects, with kind/apiVersion (unlike an HTTP list's items)."""
        kind = self.kind(resource)
        labels = parse_label_selector(label_selector)
        fields = parse_field_selector(field_selector, kind)
        with self._lock:
            return [
                copy.deepcopy(obj)
                for key, obj in sorted(self._objects[kind].items())
                if (namespace is None or key[0] == namespace)
                and labels_match(labels, obj)
                and fields_match(fields, obj)
            ]

    def compact(self) -> str:
        """Forget the event history up to now, as etcd compaction does: watches
        from an older resourceVersion, and continue tokens issued before, get
        410 Expired. Open watches are unaffected. Returns the compaction point."""
        with self._lock:
            self._history.clear()
            self._compacted = self._rv
            return str(self._rv)

    # Faults and observation.

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        resource: str | None = None,
        verb: str | None = None,
        message: str = "injected fault",
        retry_after: int | None = None,
    ) -> None:
        """Answer the next n matching API requests (not discovery) with a
        Status error. A watch failed with 410 gets it as an ERROR event inside
        an HTTP 200, as kube-apiserver sends it."""
        plural = self.kind(resource).plural if resource else None
        with self._lock:
            self._faults.append(_Fault(n, status, plural, verb, message, retry_after, False))

    def reset_next(
        self, n: int = 1, *, resource: str | None = None, verb: str | None = None
    ) -> None:
        """Reset the connection of the next n matching requests without an answer."""
        plural = self.kind(resource).plural if resource else None
        with self._lock:
            self._faults.append(_Fault(n, 0, plural, verb, "", None, True))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def requests(
        self,
        *,
        verb: str | None = None,
        resource: str | None = None,
        method: str | None = None,
        namespace: str | None = None,
        since: float | None = None,
    ) -> builtins.list[RequestRecord]:
        """Requests seen, oldest first; `since` is a `time.monotonic()` value."""
        plural = self.kind(resource).plural if resource else None
        with self._lock:
            return [
                r
                for r in self._records
                if (verb is None or r.verb == verb)
                and (plural is None or r.resource == plural)
                and (method is None or r.method == method)
                and (namespace is None or r.namespace == namespace)
                and (since is None or r.time >= since)
            ]

    def count(
        self,
        *,
        verb: str | None = None,
        resource: str | None = None,
        method: str | None = None,
        namespace: str | None = None,
        since: float | None = None,
    ) -> int:
        return len(
            self.requests(
                verb=verb, resource=resource, method=method, namespace=namespace, since=since
            )
        )

    def clear_requests(self) -> None:
        with self._lock:
            self._records.clear()

    def open_watches(self, resource: str | None = None) -> int:
        kind = self.kind(resource) if resource else None
        with self._lock:
            return sum(1 for w in self._watchers if kind is None or w.kind is kind)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Poll a condition from a thread other than the emulator's loop."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(0.01)

    async def until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """`wait_until` for async tests, also in the emulator's own loop."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            await asyncio.sleep(0.01)

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig for this emulator (JSON, which is YAML), for subprocesses."""
        cluster: JSON = {"server": self.url}
        if self.ca_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": cluster}],
            "users": [{"name": "emulator", "user": {"token": self.token or "emulator-token"}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
                }
            ],
            "current-context": "emulator",
        }
        path.write_text(json.dumps(config, indent=2))
        return path

    # Admission.

    def map_service(self, namespace: str, name: str, port: int, address: str) -> None:
        """Webhooks with clientConfig.service {namespace, name, port} are
        called at `address` ("host:port")."""
        with self._lock:
            self.services[(namespace, name, port)] = address

    # Port-forward.

    def map_pod_port(
        self, namespace: str, name: str, port: int, target: portforward.Target
    ) -> None:
        """Where `pods/<name>/portforward` takes connections to `port` of the
        Pod: "host:port", or a coroutine function returning a connected
        (StreamReader, StreamWriter), e.g. `tests.netns.Pod.connector(port)`,
        which connects inside the Pod's network namespace as kubelet's
        runtime does. Called on the emulator's loop, per connection."""
        with self._lock:
            self._pod_ports[(namespace, name, port)] = target

    def map_pod_exec(self, namespace: str, name: str, runner: pod_exec.Runner) -> None:
        """What `pods/<name>/exec` runs: the emulator has no containers, so
        a test says (tests/kube/exec.py, e.g. `subprocess_runner`)."""
        with self._lock:
            self._pod_execs[(namespace, name)] = runner

    def admission_calls(
        self, *, webhook: str | None = None, configuration: str | None = None
    ) -> builtins.list[AdmissionCall]:
        """Webhook calls made, oldest first."""
        with self._lock:
            return [
                c
                for c in self._admission_calls
                if (webhook is None or c.webhook == webhook)
                and (configuration is None or c.configuration == configuration)
            ]

    def clear_admission_calls(self) -> None:
        with self._lock:
            self._admission_calls.clear()

    # Service-account tokens.

    def mint_token(
        self,
        namespace: str,
        service_account: str,
        *,
        audiences: Sequence[str] = ("shoal",),
        ttl: float = DEFAULT_TOKEN_SECONDS,
        pod: str | None = None,
    ) -> str:
        """A TokenRequest's token, as the kubelet gets it for a projected
        volume. Unlike the HTTP API, any `ttl` is accepted (the API insists
        on at least 10 minutes), so a test can make short-lived tokens."""
        body: JSON = {"spec": {"audiences": list(audiences), "expirationSeconds": ttl}}
        if pod is not None:
            body["spec"]["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod}
        answer = self._token_request(namespace, service_account, body, checked=False)
        token: str = answer["status"]["token"]
        return token

    def token_for_pod(
        self,
        namespace: str,
        pod: str,
        *,
        audience: str = "shoal",
        ttl: float = DEFAULT_TOKEN_SECONDS,
    ) -> str:
        """The token the kubelet would project into `pod` for a
        serviceAccountToken volume with this audience: bound to the Pod, for
        its spec.serviceAccountName. That ServiceAccount is created if
        missing, as the ServiceAccount admission plugin and controller
        guarantee it exists in a cluster."""
        with self._lock:
            found = self.get("pods", pod, namespace=namespace)
            if found is None:
                raise _not_found(self.kind("pods"), pod)
            account = (found.get("spec") or {}).get("serviceAccountName") or "default"
            if self.get("serviceaccounts", account, namespace=namespace) is None:
                self.create(
                    {
                        "apiVersion": "v1",
                        "kind": "ServiceAccount",
                        "metadata": {"name": account, "namespace": namespace},
                    }
                )
        return self.mint_token(namespace, account, audiences=(audience,), ttl=ttl, pod=pod)

    def review_token(self, token: str, audiences: Sequence[str] = ()) -> JSON:
        """The status of a TokenReview of `token`, as the HTTP API answers it."""
        review = self._token_review({"spec": {"token": token, "audiences": list(audiences)}})
        status: JSON = review["status"]
        return status

    @property
    def jwks(self) -> JSON:
        """The public keys that verify the tokens (also at /openid/v1/jwks)."""
        return self._signer.jwks()

    # ------------------------------------------------------------------ store

    def _namespace_of(self, kind: Kind, obj: Mapping[str, Any]) -> str | None:
        if not kind.namespaced:
            return None
        meta = obj.get("metadata")
        namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
        return namespace or "default"

    def _default_namespace(self, kind: Kind, namespace: str) -> str | None:
        if not kind.namespaced:
            return None
        return namespace or "default"

    def _decode(self, kind: Kind, body: Any) -> JSON:
        """A private copy of a request body, its type checked against the URL."""
        if not isinstance(body, Mapping):
            raise _bad_request(f"the body of the request is not a {kind.kind} object")
        obj = copy.deepcopy(dict(body))
        api_version, kind_name = obj.get("apiVersion"), obj.get("kind")
        if api_version not in (None, "", kind.api_version) or kind_name not in (
            None,
            "",
            kind.kind,
        ):
            raise _bad_request(
                f"the API version in the data ({api_version}) does not match the expected API "
                f"version ({kind.api_version}), or the kind ({kind_name}) is not {kind.kind}"
            )
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise _bad_request("metadata must be an object")
        return obj

    def _check_namespace_field(self, kind: Kind, namespace: str | None, meta: JSON) -> None:
        if not kind.namespaced:
            meta.pop("namespace", None)
            return
        given = meta.get("namespace")
        if given and given != namespace:
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        meta["namespace"] = namespace

    def _validate_name(self, kind: Kind, name: str) -> None:
        pattern, longest, why = _NAME_RULES[kind.name_rule]
        if len(name) > longest or not pattern.match(name):
            raise _invalid(kind.kind, name, "metadata.name", f'Invalid value: "{name}": {why}')

    def _check_namespace_exists(self, kind: Kind, namespace: str | None) -> None:
        """The NamespaceLifecycle admission plugin, which runs before webhooks."""
        if kind.namespaced and self._require_namespace and self._namespaces is not None:
            assert namespace is not None
            with self._lock:
                if ("", namespace) not in self._objects[self._namespaces]:
                    raise _not_found(self._namespaces, namespace)

    def _create(
        self, kind: Kind, namespace: str | None, body: Any, *, dry_run: bool = False
    ) -> JSON:
        obj = self._decode(kind, body)
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            # kube-apiserver's storage refuses it rather than ignoring it.
            raise KubeError(500, "resourceVersion should not be set on objects to be created")
        self._check_namespace_field(kind, namespace, meta)
        with self._lock:
            self._check_namespace_exists(kind, namespace)
            name = meta.get("name") or ""
            if not name:
                prefix = meta.get("generateName")
                if not prefix:
                    raise _invalid(
                        kind.kind,
                        "",
                        "metadata.name",
                        "Required value: name or generateName is required",
                    )
                # API Concepts, "Generated values": generateName gets a unique random suffix.
                while True:
                    name = prefix + "".join(random.choices(_SUFFIX_ALPHABET, k=5))
                    if (namespace or "", name) not in self._objects[kind]:
                        break
            self._validate_name(kind, name)
            key = (namespace or "", name)
            # API Concepts, "Object names": one object of a kind per name in a
            # namespace (in the cluster, for cluster-scoped kinds).
            if key in self._objects[kind]:
                raise KubeError(
                    409,
                    f'{kind.group_resource} "{name}" already exists',
                    reason="AlreadyExists",
                    details=_details(kind, name),
                )
            meta["name"] = name
            return self._insert(kind, key, obj, dry_run=dry_run)

    def _insert(
        self, kind: Kind, key: tuple[str, str], obj: JSON, *, dry_run: bool = False
    ) -> JSON:
        obj.setdefault("apiVersion", kind.api_version)
        obj.setdefault("kind", kind.kind)
        meta = obj.setdefault("metadata", {})
        meta["name"] = key[1]
        if kind.namespaced:
            meta["namespace"] = key[0]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["generation"] = 1
        for system in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(system, None)
        self._default(kind, obj, None)
        if dry_run:
            # "Dry-run" (API Concepts): the answer is what would be stored,
            # generated fields included, but nothing is and no
            # resourceVersion is spent.
            return obj
        return self._commit(kind, "ADDED", key, obj, None)

    def _update(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        force: bool = False,
        dry_run: bool = False,
    ) -> tuple[JSON, bool]:
        with self._lock:
            obj, current = self._update_candidate(kind, namespace, name, body, force=force)
            if current is None:
                return self._create(kind, namespace, obj, dry_run=dry_run), True
            key = (namespace or "", name)
            return self._replace(kind, key, current, obj, dry_run=dry_run), False

    def _update_candidate(
        self, kind: Kind, namespace: str | None, name: str, body: Any, *, force: bool = False
    ) -> tuple[JSON, JSON | None]:
        """What a PUT would store, and the object it replaces (None: the PUT
        creates it). Nothing is written."""
        obj = self._decode(kind, body)
        meta = obj["metadata"]
        if meta.get("name") != name:
            raise _bad_request(
                f"the name of the object ({meta.get('name')}) does not match the name on the URL "
                f"({name})"
            )
        self._check_namespace_field(kind, namespace, meta)
        key = (namespace or "", name)
        with self._lock:
            current = self._objects[kind].get(key)
            if current is None:
                if not kind.create_on_update:
                    raise _not_found(kind, name)
                meta.pop("resourceVersion", None)
                return obj, None
            # API Concepts, "Updates to existing resources": the resourceVersion
            # in a PUT detects lost updates, a stale one is 409 Conflict.
            given = meta.get("resourceVersion") or ""
            if not given:
                if not (kind.unconditional_update or force):
                    raise _invalid(
                        kind.group_resource,
                        name,
                        "metadata.resourceVersion",
                        "Invalid value: 0x0: must be specified for an update",
                    )
            elif given != current["metadata"]["resourceVersion"]:
                raise _conflict(kind, name, OPTIMISTIC_LOCK_MESSAGE)
            self._keep_system_fields(obj, current)
            return obj, current

    @staticmethod
    def _keep_system_fields(obj: JSON, current: JSON) -> None:
        meta, old = obj["metadata"], current["metadata"]
        for system in ("uid", "creationTimestamp", "name", "namespace"):
            if system in old:
                meta[system] = old[system]
        meta["resourceVersion"] = old["resourceVersion"]
        meta["generation"] = old.get("generation", 1)

    def _replace(
        self,
        kind: Kind,
        key: tuple[str, str],
        current: JSON,
        obj: JSON,
        *,
        dry_run: bool = False,
    ) -> JSON:
        self._keep_system_fields(obj, current)
        meta = obj["metadata"]
        if any(sub[0] == "status" for sub in kind.subresources):
            # With a status subresource, the object's own PUT and PATCH
            # leave the status alone (only /status writes it).
            if "status" in current:
                obj["status"] = current["status"]
            else:
                obj.pop("status", None)
        self._default(kind, obj, current)
        if obj == current:
            # kube-apiserver skips writes that change nothing: no new
            # resourceVersion, no watch event.
            return current
        if _spec_of(obj) != _spec_of(current):
            meta["generation"] += 1
        if dry_run:
            return obj
        return self._commit(kind, "MODIFIED", key, obj, current)

    def _patch(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        content_type: str,
        patch: Any,
        *,
        dry_run: bool = False,
    ) -> JSON:
        key = (namespace or "", name)
        with self._lock:
            patched, current = self._patch_candidate(kind, namespace, name, content_type, patch)
            return self._replace(kind, key, current, patched, dry_run=dry_run)

    def _patch_candidate(
        self, kind: Kind, namespace: str | None, name: str, content_type: str, patch: Any
    ) -> tuple[JSON, JSON]:
        """What a PATCH would store, and the object it replaces."""
        key = (namespace or "", name)
        with self._lock:
            current = self._objects[kind].get(key)
            if current is None:
                raise _not_found(kind, name)
            doc = copy.deepcopy(current)
            # API Concepts, "Updates to existing resources": the patch type is
            # the Content-Type.
            if content_type == "application/json-patch+json":
                if not isinstance(patch, list):
                    raise _bad_request("a JSON patch must be a list of operations")
                try:
                    patched = jsonpatch.JsonPatch(patch).apply(doc)
                except jsonpatch.InvalidJsonPatch as err:
                    raise _bad_request(str(err)) from None
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
                    raise KubeError(422, str(err)) from None
                except (KeyError, TypeError) as err:
                    raise _bad_request(f"invalid JSON patch: {err}") from None
            elif content_type in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
            ):
                if content_type.startswith("application/strategic") and kind.custom:
                    # API Concepts, "Updates to existing resources": no
                    # strategic merge patch for custom resources.
                    raise KubeError(
                        415,
                        "the body of the request was in an unknown format - accepted media types "
                        "include: application/json-patch+json, application/merge-patch+json, "
                        "application/apply-patch+yaml",
                    )
                if not isinstance(patch, dict):
                    raise _bad_request("a merge patch must be a JSON object")
                if content_type.startswith("application/strategic"):
                    schema = {"$ref": schema_name(kind)}
                    patched = strategic_merge_patch(doc, patch, schema)
                else:
                    patched = merge_patch(doc, patch)
            else:
                raise KubeError(
                    415,
                    f"the body of the request was in an unknown format ({content_type}) - accepted "
                    "media types include: application/json-patch+json, "
                    "application/merge-patch+json, application/strategic-merge-patch+json",
                )
            if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
                raise KubeError(422, "the patched object is not a Kubernetes object")
            patched_meta = patched["metadata"]
            if patched.get("kind") != kind.kind or patched.get("apiVersion") != kind.api_version:
                raise _bad_request("a patch cannot change kind or apiVersion")
            if patched_meta.get("name") != name or (
                kind.namespaced and patched_meta.get("namespace") != namespace
            ):
                raise _bad_request("a patch cannot change the name or namespace")
            # A resourceVersion in the patch makes it conditional (API Concepts,
            # "Updates to existing resources").
            given = patched_meta.get("resourceVersion")
            if given and given != current["metadata"]["resourceVersion"]:
                raise _conflict(kind, name, OPTIMISTIC_LOCK_MESSAGE)
            self._keep_system_fields(patched, current)
            return patched, current

    def _delete(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        options: Mapping[str, Any],
        *,
        dry_run: bool = False,
    ) -> JSON:
        key = (namespace or "", name)
        with self._lock:
            current = self._objects[kind].get(key)
            if current is None:
                raise _not_found(kind, name)
            pre = options.get("preconditions") or {}
            meta = current["metadata"]
            if pre.get("uid") and pre["uid"] != meta["uid"]:
                raise _conflict(
                    kind,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object "
                    f"meta: {meta['uid']}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
                raise _conflict(
                    kind,
                    name,
                    f"Precondition failed: ResourceVersion in precondition: "
                    f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                    f"{meta['resourceVersion']}",
                )
            if dry_run:
                return copy.deepcopy(current)
            if kind is self._namespaces:
                # API Concepts, "Resource URIs": namespaced objects go with their
                # namespace. (kube-apiserver first shows it Terminating while
                # the namespace controller empties it; here it is immediate.)
                for other in self._kinds:
                    if other.namespaced:
                        for k in [k for k in self._objects[other] if k[0] == name]:
                            self._remove(other, k)
            return self._remove(kind, key)

    def _remove(self, kind: Kind, key: tuple[str, str]) -> JSON:
        current = self._objects[kind][key]
        gone = dict(current)
        gone["metadata"] = dict(current["metadata"])
        return self._commit(kind, "DELETED", key, gone, current)

    def _commit(
        self, kind: Kind, type_: str, key: tuple[str, str], obj: JSON, prev: JSON | None
    ) -> JSON:
        """The one place state changes. Called with the lock held."""
        # API Concepts, "Resource versions": one counter for every kind, as
        # etcd's revision is; a deleted object carries the deletion's version.
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if type_ == "DELETED":
            del self._objects[kind][key]
        else:
            self._objects[kind][key] = obj
        change = _Change(self._rv, type_, kind, key, obj, prev)
        # API Concepts, "Efficient detection of changes": history is kept for a
        # limited window only.
        self._history.append(change)
        while len(self._history) > self._history_limit:
            self._compacted = self._history.popleft().rv
        for watcher in self._watchers:
            if watcher.kind is kind:
                watcher.queue.append(change)
                watcher.poke()
        return obj

    def _default(self, kind: Kind, obj: JSON, current: JSON | None) -> None:
        """What kube-apiserver fills in on every write."""
        meta = obj["metadata"]
        if kind.group == "" and kind.plural == "secrets":
            # Conversion, not defaulting: stringData is write-only.
            string_data = obj.pop("stringData", None)
            if isinstance(string_data, dict) and string_data:
                data = obj["data"] = dict(obj.get("data") or {})
                for k, v in string_data.items():
                    data[k] = base64.b64encode(str(v).encode()).decode()
            obj.setdefault("type", "Opaque")
        if kind.group == "admissionregistration.k8s.io" and kind.kind == (
            "MutatingWebhookConfiguration"
        ):
            _default_webhooks(obj)
            if self._validate_webhooks:
                # Configurations stored with sideEffects Unknown or Some
                # (through v1beta1) may keep them on update.
                strict = current is None or all(
                    h.get("sideEffects") in _SIDE_EFFECTS_V1
                    for h in current.get("webhooks") or []
                    if isinstance(h, dict)
                )
                problem = _webhook_problem(obj, strict_side_effects=strict)
                if problem is not None:
                    raise _invalid(WEBHOOK_CONFIGURATION, meta["name"], *problem)
        if kind.group == "" and kind.plural == "events":
            problem = _event_problem(obj)
            if problem is not None:
                raise _invalid(kind.kind, meta["name"], *problem)
        if not self._defaulting:
            return
        if kind is self._namespaces:
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj.setdefault("status", {}).setdefault("phase", "Active")
        elif kind.group == "" and kind.plural == "services":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            if spec["type"] != "ExternalName" and not spec.get("clusterIP"):
                old = (current or {}).get("spec", {}).get("clusterIP")
                spec["clusterIP"] = old or self._allocate_ip()
            if spec.get("clusterIP") and spec["type"] != "ExternalName":
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
            for port in spec.get("ports") or []:
                if isinstance(port, dict):
                    port.setdefault("protocol", "TCP")
                    port.setdefault("targetPort", port.get("port"))

    def _allocate_ip(self) -> str:
        self._next_ip += 1
        return str(ipaddress.ip_address("10.96.0.0") + self._next_ip)

    def _state_at(self, kind: Kind, rv: int) -> dict[tuple[str, str], JSON]:
        """The objects of a kind as they were at resourceVersion rv, rebuilt by
        undoing later writes (what etcd's MVCC gives kube-apiserver)."""
        if rv < self._compacted:
            raise _expired(f"too old resource version: {rv} ({self._compacted})")
        state = dict(self._objects[kind])
        for change in reversed(self._history):
            if change.rv <= rv:
                break
            if change.kind is kind:
                if change.prev is None:
                    state.pop(change.key, None)
                else:
                    state[change.key] = change.prev
        return state

    def _list(self, kind: Kind, namespace: str | None, query: Mapping[str, str]) -> JSON:
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""), kind)
        limit = _int_param(query, "limit")
        token = query.get("continue", "")
        rv_param = query.get("resourceVersion", "")
        rv_match = query.get("resourceVersionMatch", "")
        if rv_match and rv_match not in ("Exact", "NotOlderThan"):
            raise _invalid(
                "ListOptions.meta.k8s.io", "", "resourceVersionMatch", "Unsupported value"
            )
        if rv_match and not rv_param:
            raise _invalid(
                "ListOptions.meta.k8s.io",
                "",
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            )
        start: tuple[str, str] | None = None
        with self._lock:
            # API Concepts, "Semantics for get and list".
            if token:
                if rv_param not in ("", "0"):
                    raise _bad_request(
                        "specifying resource version is not allowed when using continue"
                    )
                list_rv, start = _decode_continue(token)
                if list_rv < self._compacted:
                    # API Concepts, "Retrieving large results sets in chunks":
                    # an old continue token is 410 Gone.
                    raise _expired(
                        "The provided continue parameter is too old to display a consistent "
                        "list result. You can start a new list without the continue parameter."
                    )
                state = self._state_at(kind, list_rv)
            elif rv_param not in ("", "0") and (rv_match == "Exact" or (not rv_match and limit)):
                list_rv = _rv_value(rv_param)
                state = self._state_at(kind, list_rv)
            else:
                list_rv, state = self._rv, self._objects[kind]
            matched = [
                (key, obj)
                for key, obj in sorted(state.items())
                if (namespace is None or key[0] == namespace)
                and (start is None or key > start)
                and labels_match(labels, obj)
                and fields_match(fields, obj)
            ]
        page = matched[:limit] if limit else matched
        meta: JSON = {"resourceVersion": str(list_rv)}
        if limit and len(matched) > limit:
            meta["continue"] = _encode_continue(list_rv, page[-1][0])
            if not labels and not fields:
                # API Concepts, "Retrieving large results sets in chunks": no
                # count when selectors make it unknown.
                meta["remainingItemCount"] = len(matched) - limit
        # API Concepts, "Collections": the kind is the item kind + "List".
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": meta,
            # Built-in kinds' list items carry no kind/apiVersion (typed lists);
            # custom resources' do (unstructured lists).
            "items": [obj if kind.custom else _without_type_meta(obj) for _, obj in page],
        }

    # ------------------------------------------------------------------ admission

    def _admitted(
        self,
        operation: str,
        kind: Kind,
        namespace: str | None,
        obj: Mapping[str, Any],
        old: Mapping[str, Any] | None,
    ) -> builtins.list[_Hook]:
        """The webhooks a request goes to, in kube-apiserver's order:
        configurations by name, then each one's webhooks as listed."""
        if kind.group in _NEVER_ADMITTED or not kind.stored:
            return []
        configs_kind = self._by_type.get(
            ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration")
        )
        if configs_kind is None:
            return []
        with self._lock:
            configs = sorted(self._objects[configs_kind].items())
            if not configs:
                return []
            ns_obj = (
                self._objects[self._namespaces].get(("", namespace))
                if namespace is not None and self._namespaces is not None
                else None
            )
            ns_labels = dict((ns_obj or {}).get("metadata", {}).get("labels") or {})
        hooks: builtins.list[_Hook] = []
        for (_, config_name), config in configs:
            for hook in config.get("webhooks") or []:
                if isinstance(hook, dict) and self._hook_matches(
                    hook, operation, kind, namespace, obj, old, ns_labels
                ):
                    hooks.append(_Hook(config_name, copy.deepcopy(hook)))
        return hooks

    def _hook_matches(
        self,
        hook: Mapping[str, Any],
        operation: str,
        kind: Kind,
        namespace: str | None,
        obj: Mapping[str, Any],
        old: Mapping[str, Any] | None,
        ns_labels: Mapping[str, str],
    ) -> bool:
        cluster = namespace is None
        if not any(
            isinstance(rule, Mapping) and _rule_matches(rule, operation, kind, None, cluster)
            for rule in hook.get("rules") or []
        ):
            return False
        # "Matching requests: namespaceSelector": the labels of the request's
        # namespace; a Namespace is matched by its own labels; other
        # cluster-scoped objects are never skipped by it.
        ns_selector = selector_requirements(hook.get("namespaceSelector"))
        if ns_selector is None:
            return False
        if not cluster:
            if not labels_match(ns_selector, {"metadata": {"labels": ns_labels}}):
                return False
        elif kind is self._namespaces:
            labels = dict(obj.get("metadata", {}).get("labels") or {})
            # Defaulting (before admission) adds the name label.
            labels.setdefault("kubernetes.io/metadata.name", obj.get("metadata", {}).get("name"))
            if not labels_match(ns_selector, {"metadata": {"labels": labels}}):
                return False
        # "Matching requests: objectSelector": the object or the old object.
        obj_selector = selector_requirements(hook.get("objectSelector"))
        if obj_selector is None:
            return False
        return any(labels_match(obj_selector, o) for o in (obj, old) if o is not None)

    async def _acreate(
        self,
        kind: Kind,
        namespace: str | None,
        body: Any,
        *,
        dry_run: bool = False,
        user: JSON | None = None,
        options: JSON | None = None,
        warnings: builtins.list[str] | None = None,
    ) -> JSON:
        obj = self._decode(kind, body)
        self._check_namespace_field(kind, namespace, obj["metadata"])
        # NamespaceLifecycle runs before the webhooks; name and uniqueness
        # checks come after them, in storage.
        self._check_namespace_exists(kind, namespace)
        obj = await self._admit(
            "CREATE", kind, namespace, obj, None, dry_run, user, options, warnings
        )
        return self._create(kind, namespace, obj, dry_run=dry_run)

    async def _aupdate(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        force: bool = False,
        dry_run: bool = False,
        user: JSON | None = None,
        options: JSON | None = None,
        warnings: builtins.list[str] | None = None,
    ) -> tuple[JSON, bool]:
        key = (namespace or "", name)
        for _ in range(_ADMISSION_RETRIES):
            candidate, current = self._update_candidate(kind, namespace, name, body, force=force)
            if current is None:
                created = await self._acreate(
                    kind,
                    namespace,
                    candidate,
                    dry_run=dry_run,
                    user=user,
                    options=options,
                    warnings=warnings,
                )
                return created, True
            admitted = await self._admit(
                "UPDATE", kind, namespace, candidate, current, dry_run, user, options, warnings
            )
            with self._lock:
                now = self._objects[kind].get(key)
                if (
                    now is not None
                    and now["metadata"]["resourceVersion"]
                    == (current["metadata"]["resourceVersion"])
                ):
                    return self._replace(kind, key, now, admitted, dry_run=dry_run), False
        raise _conflict(kind, name, OPTIMISTIC_LOCK_MESSAGE)

    async def _apatch(
        self,
        kind: Kind,
        namespace: str | None,
        name: str,
        content_type: str,
        patch: Any,
        *,
        dry_run: bool = False,
        user: JSON | None = None,
        options: JSON | None = None,
        warnings: builtins.list[str] | None = None,
        field_validation: str | None = None,
    ) -> JSON:
        key = (namespace or "", name)
        if options is None:
            options = {"kind": "PatchOptions", "apiVersion": "meta.k8s.io/v1"}
            if dry_run:
                options["dryRun"] = ["All"]
        for _ in range(_ADMISSION_RETRIES):
            candidate, current = self._patch_candidate(kind, namespace, name, content_type, patch)
            if field_validation is not None:
                candidate = self._check_fields(
                    kind, candidate, field_validation, warnings if warnings is not None else []
                )
            admitted = await self._admit(
                "UPDATE", kind, namespace, candidate, current, dry_run, user, options, warnings
            )
            with self._lock:
                now = self._objects[kind].get(key)
                if (
                    now is not None
                    and now["metadata"]["resourceVersion"]
                    == (current["metadata"]["resourceVersion"])
                ):
                    return self._replace(kind, key, now, admitted, dry_run=dry_run)
        raise _conflict(kind, name, OPTIMISTIC_LOCK_MESSAGE)

    async def _admit(
        self,
        operation: str,
        kind: Kind,
        namespace: str | None,
        obj: JSON,
        old: JSON | None,
        dry_run: bool,
        user: JSON | None,
        options: JSON | None,
        warnings: builtins.list[str] | None,
    ) -> JSON:
        """The mutating webhooks, in order, each seeing the previous one's
        result; then, once, the IfNeeded ones a later webhook changed the
        object after ("Reinvocation policy")."""
        hooks = self._admitted(operation, kind, namespace, obj, old)
        invoked: builtins.list[int] = []
        reinvoke: set[int] = set()
        for round_ in (1, 2):
            for index, hook in enumerate(hooks):
                if round_ == 2 and index not in reinvoke:
                    continue
                changed, obj = await self._call_hook(
                    hook,
                    round_,
                    operation,
                    kind,
                    namespace,
                    obj,
                    old,
                    dry_run,
                    user if user is not None else self.admin_user,
                    options,
                    warnings if warnings is not None else [],
                )
                if changed and round_ == 1:
                    reinvoke.update(invoked)
                if hook.webhook.get("reinvocationPolicy") == "IfNeeded":
                    invoked.append(index)
            if not reinvoke:
                break
        return obj

    def _webhook_target(self, hook: _Hook) -> tuple[str, str, str | None]:
        """(the URL as kube-apiserver names it, the URL to connect to, the
        TLS server name to verify if not the URL's host)."""
        config = hook.webhook.get("clientConfig") or {}
        timeout = f"timeout={hook.webhook.get('timeoutSeconds', 10)}s"
        url = config.get("url")
        if url:
            shown = f"{url}{'&' if '?' in url else '?'}{timeout}"
            return shown, shown, None
        service = config.get("service") or {}
        name, namespace = service.get("name"), service.get("namespace")
        port = int(service.get("port") or 443)
        path = service.get("path") or ""
        query = f"{'&' if '?' in path else '?'}{timeout}"
        host = f"{name}.{namespace}.svc"
        shown = f"https://{host}:{port}{path}{query}"
        with self._lock:
            address = self.services.get((str(namespace), str(name), port))
        if address is None:
            raise _CallFailed(
                f'failed to call webhook: Post "{shown}": service "{namespace}/{name}" port '
                f"{port} has no address (KubeEmulator services= or map_service())"
            )
        return shown, f"https://{address}{path}{query}", host

    def _ssl_context(self, bundle: str) -> ssl.SSLContext:
        context = self._ssl_contexts.get(bundle)
        if context is None:
            if bundle:
                # "Contacting the webhook": caBundle verifies the server's
                # certificate; without it, the system's trust roots do.
                pem = base64.b64decode(bundle).decode()
                context = ssl.create_default_context(cadata=pem)
            else:
                context = ssl.create_default_context()
            self._ssl_contexts[bundle] = context
        return context

    async def _post_review(
        self, hook: _Hook, shown: str, target: str, server_hostname: str | None, review: JSON
    ) -> JSON:
        """POST the AdmissionReview; the answer, checked as kube-apiserver
        checks it (VerifyAdmissionResponse). _CallFailed on any failure."""
        timeout = float(hook.webhook.get("timeoutSeconds", 10))
        bundle = str((hook.webhook.get("clientConfig") or {}).get("caBundle") or "")
        try:
            context = self._ssl_context(bundle)
        except (ValueError, ssl.SSLError) as err:
            raise _CallFailed(
                f'failed to call webhook: Post "{shown}": bad caBundle: {err}'
            ) from None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if server_hostname is not None:
            headers["Host"] = shown.split("/")[2]
        # One session (and its kept-alive connections) on the emulator's
        # loop, as kube-apiserver caches webhook clients; another loop (a
        # test awaiting acreate() elsewhere) gets its own for the call.
        own = self._loop is not asyncio.get_running_loop()
        if own:
            session = aiohttp.ClientSession()
        else:
            if self._webhook_http is None or self._webhook_http.closed:
                self._webhook_http = aiohttp.ClientSession()
            session = self._webhook_http
        try:
            async with session.post(
                target,
                data=json.dumps(review).encode(),
                headers=headers,
                ssl=context,
                server_hostname=server_hostname,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            raise _CallFailed(
                f'failed to call webhook: Post "{shown}": context deadline exceeded'
            ) from None
        except (aiohttp.ClientError, OSError) as err:
            raise _CallFailed(f'failed to call webhook: Post "{shown}": {err}') from None
        finally:
            if own:
                await session.close()
        if status != 200:
            text = raw[:200].decode(errors="replace")
            raise _CallFailed(
                f"failed to call webhook: an error on the server ({text!r}) has prevented the "
                f"request from succeeding (HTTP {status})"
            )
        invalid = "received invalid webhook response"
        try:
            answer = json.loads(raw)
        except ValueError as err:
            raise _CallFailed(f"{invalid}: {err}") from None
        if not isinstance(answer, dict):
            raise _CallFailed(f"{invalid}: not an object")
        if answer.get("apiVersion") != "admission.k8s.io/v1" or answer.get("kind") != (
            "AdmissionReview"
        ):
            raise _CallFailed(
                f"{invalid}: expected webhook response of admission.k8s.io/v1, "
                f"Kind=AdmissionReview, got {answer.get('apiVersion')}, Kind={answer.get('kind')}"
            )
        response_part = answer.get("response")
        if not isinstance(response_part, dict):
            raise _CallFailed(f"{invalid}: webhook response was absent")
        if response_part.get("uid") != review["request"]["uid"]:
            raise _CallFailed(
                f'{invalid}: expected response.uid="{review["request"]["uid"]}", got '
                f'"{response_part.get("uid")}"'
            )
        if response_part.get("patch"):
            patch_type = response_part.get("patchType")
            if patch_type is None:
                raise _CallFailed(
                    f"{invalid}: webhook returned response.patch but not response.patchType"
                )
            if patch_type != "JSONPatch":
                raise _CallFailed(
                    f'{invalid}: webhook returned invalid response.patchType of "{patch_type}"'
                )
        return answer

    async def _call_hook(
        self,
        hook: _Hook,
        round_: int,
        operation: str,
        kind: Kind,
        namespace: str | None,
        obj: JSON,
        old: JSON | None,
        dry_run: bool,
        user: JSON,
        options: JSON | None,
        warnings: builtins.list[str],
    ) -> tuple[bool, JSON]:
        """One webhook: (whether it changed the object, the object now)."""
        if dry_run and hook.webhook.get("sideEffects") not in _SIDE_EFFECTS_V1:
            # "Side effects": a webhook with side effects is never sent a dry run.
            raise _bad_request(f'admission webhook "{hook.name}" does not support dry run')
        group_kind = {"group": kind.group, "version": kind.version, "kind": kind.kind}
        resource = {"group": kind.group, "version": kind.version, "resource": kind.plural}
        name = str(obj.get("metadata", {}).get("name") or "")
        request: JSON = {
            "uid": str(uuid.uuid4()),
            "kind": group_kind,
            "resource": resource,
            "requestKind": group_kind,
            "requestResource": resource,
            "operation": operation,
            "userInfo": copy.deepcopy(user),
            "object": copy.deepcopy(obj),
            "oldObject": copy.deepcopy(old),
            "dryRun": dry_run,
            "options": copy.deepcopy(options)
            or {
                "kind": "CreateOptions" if operation == "CREATE" else "UpdateOptions",
                "apiVersion": "meta.k8s.io/v1",
                **({"dryRun": ["All"]} if dry_run else {}),
            },
        }
        # Omitted when empty (generateName; cluster-scoped objects).
        if name:
            request["name"] = name
        if namespace is not None:
            request["namespace"] = namespace
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": request,
        }
        call = AdmissionCall(
            configuration=hook.configuration,
            webhook=hook.name,
            url="",
            operation=operation,
            resource=kind.plural,
            namespace=namespace,
            name=name,
            dry_run=dry_run,
            round=round_,
            request=review,
            time=time.monotonic(),
        )
        with self._lock:
            self._admission_calls.append(call)
        try:
            shown, target, server_hostname = self._webhook_target(hook)
            call.url = shown
            answer = await self._post_review(hook, shown, target, server_hostname, review)
        except _CallFailed as err:
            call.error = str(err)
            call.duration = time.monotonic() - call.time
            # "Failure policy": Ignore goes on as if the webhook was not
            # there; Fail refuses the request.
            if hook.webhook.get("failurePolicy") == "Ignore":
                return False, obj
            raise KubeError(
                500, f'Internal error occurred: failed calling webhook "{hook.name}": {err}'
            ) from None
        call.duration = time.monotonic() - call.time
        call.response = answer
        response: JSON = answer["response"]
        call.allowed = response.get("allowed") is True
        warnings.extend(str(w) for w in response.get("warnings") or [])
        if not call.allowed:
            denial = _status_of_denial(hook.name, response.get("status"))
            raise KubeError(
                denial["code"], denial["message"], denial["reason"], denial.get("details")
            )
        if not response.get("patch"):
            return False, obj
        try:
            operations = json.loads(base64.b64decode(response["patch"], validate=True))
            patched = jsonpatch.JsonPatch(operations).apply(copy.deepcopy(obj))
        except (
            ValueError,
            TypeError,
            KeyError,
            jsonpatch.JsonPatchException,
            jsonpatch.JsonPointerException,
        ) as err:
            raise KubeError(500, f"Internal error occurred: {err}") from None
        if (
            not isinstance(patched, dict)
            or patched.get("kind") != obj.get("kind")
            or patched.get("apiVersion") != obj.get("apiVersion")
            or not isinstance(patched.get("metadata"), dict)
        ):
            raise KubeError(500, "Internal error occurred: the patch changed the object's type")
        call.patched = patched != obj
        return call.patched, patched

    # ------------------------------------------------------------------ tokens

    def _token_request(self, namespace: str, name: str, body: Any, *, checked: bool = True) -> JSON:
        """POST serviceaccounts/<name>/token (Kubernetes API reference,
        "TokenRequest v1"; "Managing Service Accounts", bound tokens)."""
        if not isinstance(body, Mapping) or not isinstance(body.get("spec") or {}, Mapping):
            raise _bad_request("the body of the request is not a TokenRequest object")
        spec: Mapping[str, Any] = body.get("spec") or {}
        audiences = spec.get("audiences") or [self.issuer]
        if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
            raise _bad_request("spec.audiences must be a list of strings")
        seconds = spec.get("expirationSeconds")
        seconds = DEFAULT_TOKEN_SECONDS if seconds is None else seconds
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            raise _bad_request("spec.expirationSeconds must be an integer")
        kind_name = "TokenRequest.authentication.k8s.io"
        if checked and seconds < MIN_TOKEN_SECONDS:
            raise _invalid(
                kind_name,
                name,
                "spec.expirationSeconds",
                f"Invalid value: {seconds}: may not specify a duration less than 10 minutes",
            )
        if checked and seconds > MAX_TOKEN_SECONDS:
            raise _invalid(
                kind_name,
                name,
                "spec.expirationSeconds",
                f"Invalid value: {seconds}: may not specify a duration larger than 2^32 seconds",
            )
        ref = spec.get("boundObjectRef")
        accounts, pods = self.kind("serviceaccounts"), self.kind("pods")
        with self._lock:
            account = self._objects[accounts].get((namespace, name))
            if account is None:
                raise _not_found(accounts, name)
            bound: JSON | None = None
            if ref:
                bound = self._bound_pod(name, namespace, ref, pods)
            now = self.clock()
        claims: JSON = {
            "aud": list(audiences),
            "exp": int(now + seconds),
            "iat": int(now),
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": account["metadata"]["uid"]},
                **({"pod": bound} if bound is not None else {}),
            },
            "nbf": int(now),
            "sub": f"system:serviceaccount:{namespace}:{name}",
        }
        expires = datetime.datetime.fromtimestamp(int(now + seconds), datetime.UTC)
        out_spec: JSON = {"audiences": list(audiences), "expirationSeconds": int(seconds)}
        if ref:
            out_spec["boundObjectRef"] = dict(ref)
        return {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": None},
            "spec": out_spec,
            "status": {
                "token": self._signer.sign(claims),
                "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }

    def _bound_pod(self, account: str, namespace: str, ref: Any, pods: Kind) -> JSON:
        """The Pod a token is bound to, checked as kube-apiserver's TokenRequest
        storage checks it. Called with the lock held."""
        if not isinstance(ref, Mapping):
            raise _bad_request("spec.boundObjectRef must be an object")
        if ref.get("kind") != "Pod" or ref.get("apiVersion", "v1") != "v1":
            # kube-apiserver also binds to Secrets and Nodes; not emulated.
            raise _bad_request(
                f'cannot bind token for serviceaccount "{account}" to object of kind '
                f'"{ref.get("kind")}" (only Pods are emulated)'
            )
        pod_name = str(ref.get("name") or "")
        pod = self._objects[pods].get((namespace, pod_name))
        if pod is None:
            raise _not_found(pods, pod_name)
        uid = pod["metadata"]["uid"]
        if ref.get("uid") and ref["uid"] != uid:
            raise _conflict(
                pods,
                pod_name,
                f"the UID in the bound object reference ({ref['uid']}) does not match the UID "
                "in record. The object might have been deleted and then recreated",
            )
        if ((pod.get("spec") or {}).get("serviceAccountName") or "default") != account:
            raise _bad_request(
                f'cannot bind token for serviceaccount "{account}" to pod running with '
                "different serviceaccount name."
            )
        return {"name": pod_name, "uid": uid}

    def _token_review(self, body: Any) -> JSON:
        """POST tokenreviews (Kubernetes API reference, "TokenReview v1")."""
        if not isinstance(body, Mapping) or not isinstance(body.get("spec") or {}, Mapping):
            raise _bad_request("the body of the request is not a TokenReview object")
        spec: Mapping[str, Any] = body.get("spec") or {}
        token = spec.get("token")
        if not token or not isinstance(token, str):
            raise _bad_request("token is required for TokenReview in authentication")
        wanted = spec.get("audiences") or []
        if not isinstance(wanted, list) or not all(isinstance(a, str) for a in wanted):
            raise _bad_request("spec.audiences must be a list of strings")
        status: JSON
        try:
            user, audiences = self._authenticate_token(token, wanted or [self.issuer])
        except TokenInvalid as err:
            # Go's omitempty: a failed review has no "authenticated" field at all.
            status = {"user": {}, "error": f"[invalid bearer token, {err}]"}
        else:
            status = {"authenticated": True, "user": user, "audiences": audiences}
        return {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": dict(spec),
            "status": status,
        }

    def _authenticate_token(
        self, token: str, audiences: Sequence[str]
    ) -> tuple[JSON, builtins.list[str]]:
        """The user a service-account token is, and the audiences it is good
        for among `audiences`, checked in kube-apiserver's order: signature,
        issuer, audience, then the validator (time, ServiceAccount, Pod)."""
        claims = self._signer.verify(token)
        if claims.get("iss") != self.issuer:
            raise TokenInvalid("token lookup failed")
        token_audiences = claims.get("aud")
        if isinstance(token_audiences, str):
            token_audiences = [token_audiences]
        if not isinstance(token_audiences, list):
            token_audiences = []
        both = [a for a in audiences if a in token_audiences]
        if not both:
            raise TokenInvalid(
                f"token audiences {_go_quote(token_audiences)} is invalid for the target "
                f"audiences {_go_quote(audiences)}"
            )
        now = self.clock()
        try:
            exp, nbf, iat = (float(claims.get(c, 0)) for c in ("exp", "nbf", "iat"))
        except (TypeError, ValueError):
            raise TokenInvalid("service account token claims are malformed") from None
        if now > exp + TOKEN_LEEWAY:
            raise TokenInvalid("service account token has expired")
        if now < nbf - TOKEN_LEEWAY:
            raise TokenInvalid("service account token is not valid yet")
        if now < iat - TOKEN_LEEWAY:
            raise TokenInvalid("service account token issued in the future")
        private = claims.get("kubernetes.io")
        if not isinstance(private, dict):
            raise TokenInvalid("service account token claims are malformed")
        namespace = str(private.get("namespace") or "")
        ref = private.get("serviceaccount") or {}
        pod_ref = private.get("pod")
        with self._lock:
            account = self._objects[self.kind("serviceaccounts")].get(
                (namespace, str(ref.get("name")))
            )
            if account is None:
                raise TokenInvalid("service account token has been invalidated")
            if account["metadata"]["uid"] != ref.get("uid"):
                raise TokenInvalid(
                    f"service account UID ({account['metadata']['uid']}) does not match claim "
                    f"({ref.get('uid')})"
                )
            if pod_ref is not None:
                # "Managing Service Accounts", bound tokens: the token is
                # invalid as soon as its Pod is deleted.
                pod = self._objects[self.kind("pods")].get((namespace, str(pod_ref.get("name"))))
                if pod is None:
                    raise TokenInvalid("service account token has been invalidated")
                if pod["metadata"]["uid"] != pod_ref.get("uid"):
                    raise TokenInvalid(
                        f"pod UID ({pod['metadata']['uid']}) does not match claim "
                        f"({pod_ref.get('uid')})"
                    )
        extra: JSON = {CREDENTIAL_ID_EXTRA: [f"JTI={claims.get('jti', '')}"]}
        if pod_ref is not None:
            extra[POD_NAME_EXTRA] = [str(pod_ref.get("name"))]
            extra[POD_UID_EXTRA] = [str(pod_ref.get("uid"))]
        user: JSON = {
            "username": f"system:serviceaccount:{namespace}:{ref.get('name')}",
            "uid": str(ref.get("uid")),
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
                "system:authenticated",
            ],
            "extra": extra,
        }
        return user, both

    def _check_fields(
        self, kind: Kind, body: Any, directive: str, warnings: builtins.list[str]
    ) -> Any:
        """Server-side field validation (API Concepts, "Field validation"):
        unknown fields of a built-in kind are an error with Strict, a warning
        with Warn (the default), and dropped either way. Custom resources
        are not checked (no CRD schemas here)."""
        if kind.custom or not isinstance(body, dict):
            return body
        name = schema_name(kind)
        if name not in builtin_schemas():
            return body
        body = copy.deepcopy(body)
        unknown = unknown_fields(body, {"$ref": name})
        if unknown and directive == "Strict":
            listed = ", ".join(f'unknown field "{f}"' for f in unknown)
            raise _bad_request(
                f'{kind.kind} in version "{kind.version}" cannot be handled as a {kind.kind}: '
                f"strict decoding error: {listed}"
            )
        if directive == "Warn":
            warnings.extend(f'unknown field "{f}"' for f in unknown)
        return body

    def _caller(self, request: web.Request) -> JSON:
        """Who sent a request: the admin (the kubeconfig's token) or the
        service account whose token it carries; 401 if neither."""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        bearer = given.strip() if scheme.lower() == "bearer" else ""
        if bearer and bearer.count(".") == 2:
            with contextlib.suppress(TokenInvalid):
                return self._authenticate_token(bearer, [self.issuer])[0]
        if self.token is not None and bearer != self.token:
            raise KubeError(401, "Unauthorized", reason="Unauthorized")
        return copy.deepcopy(self.admin_user)

    # ------------------------------------------------------------------ HTTP

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = RequestRecord(time.monotonic(), request.method, request.path, dict(request.query))
        record.content_type = request.headers.get("Content-Type")
        self._record(record)
        try:
            response = await self._serve(request, record)
        except KubeError as err:
            response = _json_response(err.status, err.code, err.headers)
        except Exception as err:  # a bug here must still answer as an API server would
            response = _json_response(
                status_object(500, f"Internal error occurred: {err!r}"), 500, {}
            )
        if record.status is None:
            record.status = response.status
        record.duration = time.monotonic() - record.time
        return response

    async def _serve(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        caller = self._caller(request)
        record.user = caller["username"]
        parts = [p for p in request.path.split("/") if p]
        discovery = self._discovery(request, parts)
        if discovery is not None:
            record.verb = "discovery"
            return discovery
        route = self._route(request.method, parts, request.query)
        record.verb, record.resource = route.verb, route.kind.plural
        record.namespace, record.name = route.namespace, route.name
        record.subresource = route.subresource
        fault = self._take_fault(route)
        if fault is not None:
            record.fault = True
            if fault.reset:
                record.status = 0
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=500)
            if route.verb == "watch" and fault.status == 410:
                return await self._watch_error(request, record, _expired(fault.message).status)
            headers = {"Retry-After": str(fault.retry_after)} if fault.retry_after else {}
            details = {"retryAfterSeconds": fault.retry_after} if fault.retry_after else None
            raise KubeError(fault.status, fault.message, details=details, headers=headers)

        kind, namespace, name, query = route.kind, route.namespace, route.name, request.query
        if route.subresource == "portforward":
            assert namespace is not None and name is not None
            return await self._portforward(request, record, namespace, name)
        if route.subresource == "exec":
            assert namespace is not None and name is not None
            return await self._exec(request, record, namespace, name)
        if route.subresource == "status":
            assert name is not None
            return await self._status(request, route, kind, namespace, name)
        if route.verb == "watch":
            return await self._watch(request, record, route)
        if route.verb in ("get", "list"):
            await self._wait_for_rv(query.get("resourceVersion", ""))
            if route.verb == "get":
                assert name is not None
                with self._lock:
                    obj = self._objects[kind].get((namespace or "", name))
                if obj is None:
                    raise _not_found(kind, name)
                return _json_response(obj, 200)
            return _json_response(self._list(kind, namespace, query), 200)
        if route.subresource == "token":
            assert namespace is not None and name is not None
            return _json_response(self._token_request(namespace, name, await _body(request)), 201)
        if kind.plural == "tokenreviews" and kind.group == "authentication.k8s.io":
            return _json_response(self._token_review(await _body(request)), 201)
        dry_run = _dry_run(request)
        warnings: builtins.list[str] = []
        directive = request.query.get("fieldValidation") or "Warn"
        if directive not in _FIELD_VALIDATION:
            raise _bad_request(
                f'fieldValidation: Unsupported value: "{directive}": supported values: '
                '"Ignore", "Strict", "Warn"'
            )
        admission: dict[str, Any] = {
            "dry_run": dry_run,
            "user": caller,
            "options": _write_options(route.verb, request, dry_run),
            "warnings": warnings,
        }
        if route.verb == "create":
            body = self._check_fields(kind, await _body(request), directive, warnings)
            obj = await self._acreate(kind, namespace, body, **admission)
            return _warned(_json_response(obj, 201), warnings)
        assert name is not None or route.verb == "deletecollection"
        if route.verb == "update":
            assert name is not None
            body = self._check_fields(kind, await _body(request), directive, warnings)
            obj, created = await self._aupdate(kind, namespace, name, body, **admission)
            return _warned(_json_response(obj, 201 if created else 200), warnings)
        if route.verb == "patch":
            assert name is not None
            content_type = request.content_type
            obj = await self._apatch(
                kind,
                namespace,
                name,
                content_type,
                await _body(request),
                field_validation=directive,
                **admission,
            )
            return _warned(_json_response(obj, 200), warnings)
        options = await _body(request) if request.can_read_body else {}
        options = options if isinstance(options, dict) else {}
        if route.verb == "delete":
            assert name is not None
            # DeleteOptions may say it in the body too (kubectl delete does).
            dry_run = dry_run or options.get("dryRun") == ["All"]
            gone = self._delete(kind, namespace, name, options, dry_run=dry_run)
            return _json_response(gone, 200)
        # deletecollection
        listed = self._list(kind, namespace, {k: v for k, v in query.items() if "Selector" in k})
        deleted = []
        for item in listed["items"]:
            meta = item["metadata"]
            with contextlib.suppress(KubeError):
                deleted.append(self._delete(kind, meta.get("namespace"), meta["name"], options))
        listed["items"] = [o if kind.custom else _without_type_meta(o) for o in deleted]
        listed["metadata"] = {"resourceVersion": self.resource_version}
        return _json_response(listed, 200)

    async def _portforward(
        self, request: web.Request, record: RequestRecord, namespace: str, name: str
    ) -> web.StreamResponse:
        """kube-apiserver finds the Pod (404 if missing) and hands the upgrade
        to the Pod's kubelet, which answers 404 "pod does not exist" for a Pod
        it does not run (here: status.phase is not Running) and otherwise
        switches protocols; tests/kube/portforward.py is the rest."""
        pods = self.kind("pods")
        with self._lock:
            pod = copy.deepcopy(self._objects[pods].get((namespace, name)))
        if pod is None:
            raise _not_found(pods, name)
        if portforward.upgrade_kind(request) is None:
            raise _bad_request("Upgrade request required")
        if (pod.get("status") or {}).get("phase") != "Running":
            # kubelet's answer is plain text, passed on by kube-apiserver.
            return web.Response(status=404, text="pod does not exist")
        # What the runtime (containerd) calls the Pod's sandbox and netns.
        sandbox = hashlib.sha256(str(pod["metadata"].get("uid", name)).encode()).hexdigest()
        netns = f"/var/run/netns/cni-{uuid.UUID(sandbox[:32])}"

        async def dial(port: int) -> portforward.Connection:
            with self._lock:
                target = self._pod_ports.get((namespace, name, port))
            if target is None:
                raise ConnectionRefusedError(111, "connection refused")
            return await portforward.dial(target)

        def explain(port: int, err: BaseException) -> str:
            # containerd's wording, which kubelet prefixes and kubectl prints.
            why = "connection refused"
            if not isinstance(err, ConnectionRefusedError):
                why = (err.strerror or str(err)) if isinstance(err, OSError) else repr(err)
            return (
                f"error forwarding port {port} to pod {sandbox}, uid : failed to execute "
                f'portforward in network namespace "{netns}": failed to connect to '
                f'localhost:{port} inside namespace "{sandbox}", IPv4: dial tcp4 '
                f"127.0.0.1:{port}: connect: {why.lower()} IPv6 dial tcp6 [::1]:{port}: "
                f"connect: {why.lower()} "
            )

        record.status = 101
        response, _ = await portforward.serve(request, dial, explain)
        return response

    async def _exec(
        self, request: web.Request, record: RequestRecord, namespace: str, name: str
    ) -> web.StreamResponse:
        """kube-apiserver finds the Pod and its container, and kubelet runs
        the command in it over the v5.channel.k8s.io WebSocket protocol
        (tests/kube/exec.py); here the test's runner runs it."""
        pods = self.kind("pods")
        with self._lock:
            pod = copy.deepcopy(self._objects[pods].get((namespace, name)))
            runner = self._pod_execs.get((namespace, name))
        if pod is None:
            raise _not_found(pods, name)
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or ()]
        container = request.query.get("container") or (containers[0] if containers else "")
        if container not in containers:
            raise _bad_request(f"container {container} is not valid for pod {name}")
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            raise _bad_request("cannot exec into a container in a completed pod")
        if not pod_exec.is_upgrade(request):
            raise _bad_request("Upgrade request required")

        async def nothing(command: Sequence[str], stdin: bytes) -> tuple[int, bytes, bytes]:
            reason = f"the emulator runs no containers: map_pod_exec({namespace!r}, {name!r})\n"
            return 126, b"", reason.encode()

        record.status = 101
        return await pod_exec.serve(request, runner or nothing)

    async def _status(
        self, request: web.Request, route: _Route, kind: Kind, namespace: str | None, name: str
    ) -> web.StreamResponse:
        """The status subresource (API Concepts, "Subresources"): GET reads
        the object; PUT changes its status and nothing else, with the
        resourceVersion it read (409 if stale), generation unchanged."""
        key = (namespace or "", name)
        with self._lock:
            current = copy.deepcopy(self._objects[kind].get(key))
        if current is None:
            raise _not_found(kind, name)
        if route.verb == "get":
            return _json_response(current, 200)
        body = await _body(request)
        if not isinstance(body, dict):
            raise _bad_request("the body must be an object")
        given = (body.get("metadata") or {}).get("resourceVersion") or ""
        with self._lock:
            current = self._objects[kind].get(key)
            if current is None:
                raise _not_found(kind, name)
            if given and given != current["metadata"]["resourceVersion"]:
                raise _conflict(kind, name, OPTIMISTIC_LOCK_MESSAGE)
            obj = copy.deepcopy(current)
            if "status" in body:
                obj["status"] = body["status"]
            else:
                obj.pop("status", None)
            if obj == current:
                return _json_response(current, 200)
            return _json_response(self._commit(kind, "MODIFIED", key, obj, current), 200)

    def _take_fault(self, route: _Route) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if (fault.resource is None or fault.resource == route.kind.plural) and (
                    fault.verb is None or fault.verb == route.verb
                ):
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                    return fault
        return None

    async def _wait_for_rv(self, rv_param: str) -> None:
        """API Concepts, "Unavailable resource versions": a get or list for a
        resourceVersion the server has not reached waits briefly, then 504."""
        if rv_param in ("", "0"):
            return
        wanted = _rv_value(rv_param)
        deadline = time.monotonic() + self.too_large_wait
        while True:
            with self._lock:
                current = self._rv
            if wanted <= current:
                return
            if time.monotonic() >= deadline:
                raise KubeError(
                    504,
                    f"Too large resource version: {wanted}, current: {current}",
                    details={
                        "causes": [
                            {
                                "reason": "ResourceVersionTooLarge",
                                "message": "Too large resource version",
                            }
                        ],
                        "retryAfterSeconds": 1,
                    },
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(0.02)

    def _discovery(self, request: web.Request, parts: builtins.list[str]) -> web.Response | None:
        """Discovery ("Discovering the Kubernetes API": aggregated and
        unaggregated), the version, health, and service-account issuer
        discovery."""
        if request.method != "GET":
            return None
        if parts == ["version"]:
            return _json_response(SERVER_VERSION, 200)
        # "Service account issuer discovery": OpenID Connect metadata and keys.
        if parts == [".well-known", "openid-configuration"]:
            return _json_response(
                {
                    "issuer": self.issuer,
                    "jwks_uri": f"{self.url}/openid/v1/jwks",
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["ES256"],
                },
                200,
            )
        if parts == ["openid", "v1", "jwks"]:
            return _json_response(self._signer.jwks(), 200)
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return web.Response(text="ok")
        if parts and parts[0] == "openapi":
            return self._openapi(parts)
        groups = sorted({(k.group, k.version) for k in self._kinds if k.group})
        if parts in (["api"], ["apis"]):
            # "Aggregated discovery": every resource of every group in one
            # answer, for clients that ask for it in Accept (kubectl does);
            # others get the unaggregated document.
            aggregated = _aggregated_version(request.headers.get("Accept", ""))
            if aggregated is not None:
                wanted = [("", "v1")] if parts == ["api"] else groups
                body = {
                    "kind": "APIGroupDiscoveryList",
                    "apiVersion": f"apidiscovery.k8s.io/{aggregated}",
                    "metadata": {},
                    "items": [self._group_discovery(g, v) for g, v in wanted],
                }
                response = _json_response(body, 200)
                response.content_type = "application/json"
                response.headers["Content-Type"] = (
                    f"application/json;g=apidiscovery.k8s.io;v={aggregated};"
                    "as=APIGroupDiscoveryList"
                )
                response.headers["Vary"] = "Accept"
                return response
        if parts == ["api"]:
            return _json_response(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self._host}:{self._port}"}
                    ],
                },
                200,
            )
        if parts == ["apis"]:
            return _json_response(
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [_api_group(g, v) for g, v in groups],
                },
                200,
            )
        if len(parts) == 2 and parts[0] == "apis":
            for group, version in groups:
                if group == parts[1]:
                    return _json_response(
                        {"kind": "APIGroup", "apiVersion": "v1", **_api_group(group, version)}, 200
                    )
            return None
        gv: tuple[str, str] | None = None
        if parts == ["api", "v1"]:
            gv = ("", "v1")
        elif len(parts) == 3 and parts[0] == "apis":
            gv = (parts[1], parts[2])
        if gv is None or gv not in self._by_gv:
            return None
        resources: builtins.list[JSON] = []
        for k in self._by_gv[gv].values():
            entry: JSON = {
                "name": k.plural,
                "singularName": k.kind.lower(),
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": sorted(k.verbs),
            }
            if k.short_names:
                entry["shortNames"] = list(k.short_names)
            if k.categories:
                entry["categories"] = list(k.categories)
            resources.append(entry)
            for sub, sub_kind, group, version, verbs in k.subresources:
                resources.append(
                    {
                        "name": f"{k.plural}/{sub}",
                        "singularName": "",
                        "namespaced": k.namespaced,
                        "group": group,
                        "version": version,
                        "kind": sub_kind,
                        "verbs": list(verbs),
                    }
                )
        return _json_response(
            {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{gv[0]}/{gv[1]}" if gv[0] else gv[1],
                "resources": resources,
            },
            200,
        )

    def _openapi(self, parts: builtins.list[str]) -> web.Response | None:
        """OpenAPI v3 ("OpenAPI V3" in "Kubernetes API"): the root lists one
        document per group/version. The documents hold the paths and their
        parameters, not the schemas: enough for kubectl to see that the
        server validates fields itself (a fieldValidation parameter on each
        PATCH), so --validate=strict becomes ?fieldValidation=Strict, checked
        here; and with no strategic-merge-patch body declared, kubectl
        computes apply's patches from its compiled-in types (built-in kinds)
        or as JSON merge patches (custom resources), as it does for a server
        whose OpenAPI it cannot use. /openapi/v2 is not served."""
        gvs = sorted({(k.group, k.version) for k in self._kinds})
        documents = {
            (f"apis/{g}/{v}" if g else f"api/{v}"): self._openapi_document(g, v) for g, v in gvs
        }
        if parts == ["openapi", "v3"]:
            paths = {
                name: {
                    "serverRelativeURL": f"/openapi/v3/{name}?hash="
                    + hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest().upper()
                }
                for name, doc in documents.items()
            }
            return _json_response({"paths": paths}, 200)
        document = documents.get("/".join(parts[2:])) if parts[:2] == ["openapi", "v3"] else None
        return _json_response(document, 200) if document is not None else None

    def _openapi_document(self, group: str, version: str) -> JSON:
        paths: JSON = {}
        query = [
            {"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
            for name in ("dryRun", "fieldManager", "fieldValidation")
        ]
        for kind in self._by_gv[(group, version)].values():
            gvk = {"group": kind.group, "version": kind.version, "kind": kind.kind}
            scope = "/namespaces/{namespace}" if kind.namespaced else ""
            base = f"{kind.prefix}{scope}/{kind.plural}"

            def operation(
                action: str, body: tuple[str, ...] = (), kind: Kind = kind, gvk: JSON = gvk
            ) -> JSON:
                op: JSON = {
                    "operationId": f"{action}{kind.kind}",
                    "x-kubernetes-action": action,
                    "x-kubernetes-group-version-kind": gvk,
                    "parameters": query if body else [],
                    "responses": {"200": {"description": "OK"}},
                }
                if body:
                    content = {t: {"schema": {"type": "object"}} for t in body}
                    op["requestBody"] = {"content": content, "required": True}
                return op

            if "create" in kind.verbs:
                paths[base] = {"post": operation("post", ("application/json",))}
            if kind.stored:
                paths[base]["get"] = operation("list")
                paths[f"{base}/{{name}}"] = {
                    "get": operation("get"),
                    "put": operation("put", ("application/json",)),
                    "patch": operation(
                        "patch", ("application/json-patch+json", "application/merge-patch+json")
                    ),
                    "delete": operation("delete"),
                }
        return {
            "openapi": "3.0.0",
            "info": {"title": "Kubernetes", "version": SERVER_VERSION["gitVersion"]},
            "paths": paths,
            "components": {"schemas": {}},
        }

    def _group_discovery(self, group: str, version: str) -> JSON:
        """One APIGroupDiscovery (apidiscovery.k8s.io/v2)."""
        resources: builtins.list[JSON] = []
        for k in self._by_gv[(group, version)].values():
            entry: JSON = {
                "resource": k.plural,
                "responseKind": {"group": k.group, "version": k.version, "kind": k.kind},
                "scope": "Namespaced" if k.namespaced else "Cluster",
                "singularResource": k.kind.lower(),
                "verbs": sorted(k.verbs),
            }
            if k.short_names:
                entry["shortNames"] = list(k.short_names)
            if k.categories:
                entry["categories"] = list(k.categories)
            if k.subresources:
                entry["subresources"] = [
                    {
                        "subresource": sub,
                        "responseKind": {"group": g, "version": v, "kind": sub_kind},
                        "verbs": list(verbs),
                    }
                    for sub, sub_kind, g, v, verbs in k.subresources
                ]
            resources.append(entry)
        # The core group has no name: kube-apiserver leaves metadata.name out.
        meta: JSON = {"name": group} if group else {}
        return {
            "metadata": meta,
            "versions": [{"version": version, "resources": resources, "freshness": "Current"}],
        }

    def _route(self, method: str, parts: builtins.list[str], query: Mapping[str, str]) -> _Route:
        """API Concepts, "Resource URIs"."""
        not_found = KubeError(404, "the server could not find the requested resource")
        if parts[:2] == ["api", "v1"]:
            gv, rest = ("", "v1"), parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            gv, rest = (parts[1], parts[2]), parts[3:]
        else:
            raise not_found
        kinds = self._by_gv.get(gv)
        if not kinds or not rest:
            raise not_found
        # The old /watch/ path prefix still works on kube-apiserver.
        legacy_watch = rest[0] == "watch"
        if legacy_watch:
            rest = rest[1:]
        namespace: str | None = None
        subresource: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in kinds:
            kind = kinds[rest[2]]
            if len(rest) == 5 and rest[4] in {sub[0] for sub in kind.subresources}:
                subresource = rest[4]
            elif not kind.namespaced or len(rest) > 4:
                raise not_found  # other subresources are not emulated
            namespace, name = rest[1], (rest[3] if len(rest) >= 4 else None)
        else:
            found = kinds.get(rest[0])
            if found is None or len(rest) > 2 or (found.namespaced and len(rest) > 1):
                raise not_found
            kind, name = found, (rest[1] if len(rest) == 2 else None)
        # API Concepts, "API verbs": a GET with ?watch is a watch; a PUT is an
        # update (or a create, for kinds that allow it: see _update).
        watch = legacy_watch or _parse_bool(query.get("watch"))
        verb = {
            ("GET", False): "watch" if watch else "list",
            ("GET", True): "watch" if watch else "get",
            ("POST", False): "create",
            ("PUT", True): "update",
            ("PATCH", True): "patch",
            ("DELETE", True): "delete",
            ("DELETE", False): "deletecollection",
        }.get((method, name is not None))
        if subresource in ("portforward", "exec"):
            # kube-apiserver's verbs for a connect: get for GET, create for POST.
            verb = {"GET": "get", "POST": "create"}.get(method)
        elif subresource == "status":
            verb = {"GET": "get", "PUT": "update"}.get(method)
        elif subresource is not None:
            # The token subresource is create-only (POST on the named object).
            verb = "create" if method == "POST" and not watch else None
        # A namespaced kind is created and bulk-deleted in a namespace only.
        across_namespaces = kind.namespaced and namespace is None
        if (
            verb is None
            or (subresource is None and verb not in kind.verbs)
            or (verb in ("create", "deletecollection") and across_namespaces)
        ):
            raise KubeError(405, "the server does not allow this method on the requested resource")
        return _Route(verb, kind, namespace, name, subresource)

    async def _watch_error(
        self, request: web.Request, record: RequestRecord, status: JSON
    ) -> web.StreamResponse:
        response = await self._open_stream(request, record)
        with contextlib.suppress(ConnectionError):
            await _send(response, "ERROR", status)
            await response.write_eof()
        return response

    async def _open_stream(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        record.status = 200
        # API Concepts, "Efficient detection of changes": a chunked response of
        # JSON documents, one per change.
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "application/json", "Cache-Control": "no-cache"}
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        return response

    async def _watch(
        self, request: web.Request, record: RequestRecord, route: _Route
    ) -> web.StreamResponse:
        kind, namespace, query = route.kind, route.namespace, request.query
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""), kind)
        if route.name is not None:
            fields = (*fields, ("metadata.name", "=", route.name))
        bookmarks = _parse_bool(query.get("allowWatchBookmarks"))
        timeout = _int_param(query, "timeoutSeconds") or self.watch_timeout
        rv_param = query.get("resourceVersion", "")
        # API Concepts, "Streaming lists": sendInitialEvents asks for the state
        # first, ended by a bookmark; it needs resourceVersionMatch=NotOlderThan.
        initial_param = query.get("sendInitialEvents")
        if initial_param is not None and query.get("resourceVersionMatch") != "NotOlderThan":
            raise _invalid(
                "ListOptions.meta.k8s.io",
                "",
                "resourceVersionMatch",
                "Forbidden: sendInitialEvents requires setting resourceVersionMatch to "
                "NotOlderThan",
            )
        # API Concepts, "Semantics for watch": unset or "0" gets the state as
        # synthetic ADDED events, any other value starts exactly after it.
        if initial_param is not None:
            send_state = _parse_bool(initial_param)
        else:
            send_state = rv_param in ("", "0")
        start = self._rv if send_state or rv_param in ("", "0") else _rv_value(rv_param)
        if not send_state:
            try:
                # kube-apiserver's watch cache waits a little for a version
                # it has not seen yet, then fails the watch with 504.
                await self._wait_for_rv(rv_param)
            except KubeError as err:
                return await self._watch_error(request, record, err.status)

        def passes(obj: Mapping[str, Any]) -> bool:
            ns_ok = namespace is None or obj["metadata"].get("namespace") == namespace
            return ns_ok and labels_match(labels, obj) and fields_match(fields, obj)

        assert self._loop is not None
        watcher = _Watcher(kind, self._loop)
        watcher.transport = request.transport
        with self._lock:
            seen = self._rv
            if send_state or rv_param in ("", "0"):
                start = self._rv
                state = [o for _, o in sorted(self._objects[kind].items()) if passes(o)]
                state = state if send_state else []
                backlog: list[_Change] = []
            elif start < self._compacted:
                state, backlog = [], []
                watcher.dead = True  # expired: answered below, never registered
            else:
                state = []
                backlog = [c for c in self._history if c.rv > start and c.kind is kind]
            if not watcher.dead:
                self._watchers.add(watcher)
            compacted = self._compacted
        if watcher.dead:
            # API Concepts, "Efficient detection of changes": history too short
            # is 410 Gone, which kube-apiserver sends as an ERROR event in a 200.
            message = f"too old resource version: {start} ({compacted})"
            return await self._watch_error(request, record, _expired(message).status)

        response = await self._open_stream(request, record)
        deadline = time.monotonic() + timeout if timeout else None
        next_bookmark = time.monotonic() + self.bookmark_interval
        try:
            for obj in state:
                await _send(response, "ADDED", obj)
            if initial_param is not None and send_state and bookmarks:
                await _send(response, "BOOKMARK", _bookmark(kind, start, initial_end=True))
            pending = backlog
            while True:
                for change in pending:
                    if change.rv <= start:
                        continue
                    event = _filter(change, passes)
                    if event is not None:
                        await _send(response, *event)
                if watcher.dead:
                    return response  # cut by a fault, pause() or stop()
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    # timeoutSeconds: the server ends the watch cleanly.
                    await response.write_eof()
                    return response
                if bookmarks and now >= next_bookmark:
                    # API Concepts, "Watch bookmarks": every change up to this
                    # resourceVersion has been sent.
                    await _send(response, "BOOKMARK", _bookmark(kind, seen))
                    next_bookmark = now + self.bookmark_interval
                wait = next_bookmark - now if bookmarks else None
                if deadline is not None:
                    wait = min(wait, deadline - now) if wait is not None else deadline - now
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watcher.wake.wait(), wait)
                watcher.wake.clear()
                with self._lock:
                    pending = list(watcher.queue)
                    watcher.queue.clear()
                    seen = self._rv
        except ConnectionError:
            return response
        finally:
            with self._lock:
                self._watchers.discard(watcher)


# --------------------------------------------------------------------------- HTTP helpers


async def _call(fn: Callable[[], None]) -> None:
    """Run plain code on the emulator's loop (transports are not thread-safe)."""
    fn()


def _json_response(
    body: Mapping[str, Any], status: int, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        headers=headers,
    )


def _dry_run(request: web.Request) -> bool:
    """API Concepts, "Dry-run": ?dryRun=All, the only value there is."""
    values = request.query.getall("dryRun", [])
    for value in values:
        if value != "All":
            raise _bad_request(f'dryRun: Unsupported value: "{value}": supported values: "All"')
    return bool(values)


def _write_options(verb: str, request: web.Request, dry_run: bool) -> JSON:
    """The CreateOptions/UpdateOptions/PatchOptions an AdmissionReview carries."""
    kind = {"create": "CreateOptions", "update": "UpdateOptions"}.get(verb, "PatchOptions")
    options: JSON = {"kind": kind, "apiVersion": "meta.k8s.io/v1"}
    if dry_run:
        options["dryRun"] = ["All"]
    if request.query.get("fieldManager"):
        options["fieldManager"] = request.query["fieldManager"]
    return options


def _warned(response: web.Response, warnings: Sequence[str]) -> web.Response:
    """Webhook warnings as kube-apiserver relays them ("Response": warnings)."""
    for warning in warnings:
        text = warning.replace("\\", "\\\\").replace('"', '\\"')
        response.headers.add("Warning", f'299 - "{text}"')
    return response


async def _body(request: web.Request) -> Any:
    if "protobuf" in request.content_type or "cbor" in request.content_type:
        # API Concepts, "Alternate representations of resources": not
        # emulated; 415 lets client-go fall back to JSON.
        raise KubeError(
            415,
            f'the body of the request was in an unknown format ("{request.content_type}") - '
            "accepted media types include: application/json, application/yaml",
        )
    raw = await request.read()
    try:
        return json.loads(raw or b"null")
    except ValueError as err:
        raise _bad_request(f"the request body is not JSON: {err}") from None


async def _send(response: web.StreamResponse, type_: str, obj: Mapping[str, Any]) -> None:
    line = json.dumps({"type": type_, "object": obj}, separators=(",", ":")) + "\n"
    await response.write(line.encode())


def _filter(
    change: _Change, passes: Callable[[Mapping[str, Any]], bool]
) -> tuple[str, JSON] | None:
    """A change as one watcher with selectors sees it (kube-apiserver's
    cacheWatcher): an object that starts matching is ADDED, one that stops
    matching is DELETED (its last matching state at the new resourceVersion)."""
    now = change.type != "DELETED" and passes(change.obj)
    before = change.prev is not None and passes(change.prev)
    if now and before:
        return ("MODIFIED", change.obj)
    if now:
        return ("ADDED", change.obj)
    if before:
        if change.type == "DELETED":
            return ("DELETED", change.obj)
        assert change.prev is not None
        last = dict(change.prev)
        last["metadata"] = {**change.prev["metadata"], "resourceVersion": str(change.rv)}
        return ("DELETED", last)
    return None


def _bookmark(kind: Kind, rv: int, *, initial_end: bool = False) -> JSON:
    meta: JSON = {"resourceVersion": str(rv)}
    if initial_end:
        meta["annotations"] = {"k8s.io/initial-events-end": "true"}
    return {"kind": kind.kind, "apiVersion": kind.api_version, "metadata": meta}


def _aggregated_version(accept: str) -> str | None:
    """The apidiscovery.k8s.io version an Accept header asks for first, if
    any: kubectl sends `application/json;g=apidiscovery.k8s.io;v=v2;
    as=APIGroupDiscoveryList,...,application/json`."""
    for media_range in accept.split(","):
        kind, *raw = (part.strip() for part in media_range.split(";"))
        params = dict(p.partition("=")[::2] for p in raw)
        if kind not in ("application/json", "*/*", "application/*"):
            continue
        if not params.get("g") and not params.get("as"):
            return None  # plain JSON comes first
        if (
            params.get("g") == "apidiscovery.k8s.io"
            and params.get("as") == "APIGroupDiscoveryList"
            and params.get("v") in ("v2", "v2beta1")
        ):
            return params["v"]
    return None


def _api_group(group: str, version: str) -> JSON:
    gv = {"groupVersion": f"{group}/{version}", "version": version}
    return {"name": group, "versions": [gv], "preferredVersion": gv}


def _rv_value(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _bad_request(f"invalid resource version {text!r}") from None
    if value < 0:
        raise _bad_request(f"invalid resource version {text!r}")
    return value


def _int_param(query: Mapping[str, str], name: str) -> int | None:
    text = query.get(name)
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise _bad_request(f"{name} must be an integer, got {text!r}") from None
    return value if value > 0 else None


def _encode_continue(rv: int, last: tuple[str, str]) -> str:
    # kube-apiserver's token is base64url JSON with the list's resourceVersion
    # and where to start; clients must treat it as opaque.
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": list(last)})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, tuple[str, str]]:
    try:
        raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        rv, start = int(raw["rv"]), raw["start"]
        if raw.get("v") != "meta.k8s.io/v1" or len(start) != 2:
            raise ValueError("unknown version")
        return rv, (str(start[0]), str(start[1]))
    except (ValueError, KeyError, TypeError) as err:
        raise _bad_request(f"continue key is not valid: {err}") from None


# --------------------------------------------------------------------------- threads


@contextlib.contextmanager
def running_emulator(**options: Any) -> Iterator[KubeEmulator]:
    """A started emulator in a background thread with its own event loop, for
    synchronous tests, threaded clients and subprocesses. Stopped on exit."""
    emulator = KubeEmulator(**options)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="kube-emulator", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(emulator.start(), loop).result(timeout=10)
        try:
            yield emulator
        finally:
            asyncio.run_coroutine_threadsafe(emulator.stop(), loop).result(timeout=10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
