"""Problems as Kubernetes Events on the objects they name.

A Kubernetes user looks at `kubectl describe pod web` and `kubectl get
events` before any tool of the mesh's, so a problem that names a Kubernetes
object (a Pod, Service, Namespace, EndpointSlice, TrafficRoute, HTTPRoute...)
is written there too: a core/v1 Event on that object, type Warning, its
reason the problem's name (`SidecarMissing`), its message the code, the
reason and the fix, as `shoal analyze` says them.

One replica writes, the one holding the Lease. Events are deduplicated as
client-go's recorder does it (its EventCorrelator): one Event per object
and kind of problem, whose count and lastTimestamp go up when the problem
comes back, rather than a new Event each time. The Event's name is made
from the object (its uid included) and the code, so a replica that takes
over, or one that restarted, finds the Event written before and carries
it on instead of writing a second one.

Writes are bounded. A problem that stays has its Event's lastTimestamp
renewed every `refresh_s` (less than the API server's event TTL, an hour by
default, so the Event lasts as long as the problem), its count unchanged;
one that comes back or changes its reason has its count bumped, at most
every `min_gap_s`; and no round looks at more than `max_per_round` objects.
A problem that goes away writes nothing: its Event stays as history and
expires with the TTL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from shoal import kube
from shoal.model import problems
from shoal.registry import kubernetes

log = logging.getLogger(__name__)

LEASE = "shoal-events"
# Who writes them: `source.component`, the FROM of `kubectl describe`.
COMPONENT = "shoal"
API_VERSION = "v1"
PLURAL = "events"
# events.k8s.io's limit on a note; core/v1 has none, but a longer message
# helps nobody in `kubectl get events`.
MESSAGE_LIMIT = 1024
ELLIPSIS = "…"
# Where an Event about a cluster-scoped object lives, as client-go puts it.
CLUSTER_EVENTS_NAMESPACE = "default"

# Objects a problem may name, by kind: the kinds the mesh reads.
_KINDS: dict[str, kubernetes.Kind] = {k.kind: k for k in kubernetes.KINDS}

Key = tuple[str, str, str, str]  # (kind, namespace, name, code)


class AnalysisFailed(Exception):
    """The function that gives the problems raised."""


@dataclass(frozen=True, slots=True)
class Target:
    """The Kubernetes object a problem names."""

    kind: kubernetes.Kind
    namespace: str  # "" for a cluster-scoped object
    name: str

    @property
    def event_namespace(self) -> str:
        return self.namespace or CLUSTER_EVENTS_NAMESPACE

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind.kind} {where}{self.name}"


def target_of(subject: str) -> Target | None:
    """The object of a problem's subject (`Pod shop/web`, `Namespace shop`);
    None if it names no Kubernetes object (a file, a proxy)."""
    kind_name, _, rest = subject.partition(" ")
    kind = _KINDS.get(kind_name)
    if kind is None or not rest or " " in rest:
        return None
    if not kind.namespaced:
        return None if "/" in rest else Target(kind, "", rest)
    namespace, slash, name = rest.partition("/")
    if not slash or not namespace or not name or "/" in name:
        return None
    return Target(kind, namespace, name)


def message(found: Sequence[problems.Problem]) -> str:
    """What the Event says of the problems of one code on one object: the
    first in full, how many more there are."""
    first = min(found, key=problems.sort_key)
    where = f" ({first.field})" if first.field else ""
    more = (
        f" (and {len(found) - 1} more {first.code} on it: shoal analyze)" if len(found) > 1 else ""
    )
    text = f"{first.code} {first.reason}{where}. Fix: {first.fix or first.kind.fix}"
    # The API server counts bytes (Go's len).
    room = MESSAGE_LIMIT - len(more.encode())
    if len(text.encode()) > room:
        text = text.encode()[: room - len(ELLIPSIS.encode())].decode(errors="ignore") + ELLIPSIS
    return text + more


def event_name(target: Target, uid: str, code: str) -> str:
    """The same for the same problem on the same object, whoever writes it:
    a DNS subdomain, as object names are."""
    digest = hashlib.sha256(
        "\0".join((target.kind.kind, target.namespace, target.name, uid, code)).encode()
    ).hexdigest()[:16]
    # 253 characters at most; a cut name must still end in a letter or digit.
    prefix = target.name[: 253 - len(digest) - 1].rstrip(".-")
    return f"{prefix}.{digest}"


def _stamp(now: datetime.datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_stamp(text: Any) -> datetime.datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Written:
    """An Event as this replica last wrote (or found) it."""

    name: str
    count: int
    message: str
    at: float  # the writer's clock
    # The problem came back, or its reason changed, since: bump when allowed.
    pending: bool = False


class ProblemEvents:
    def __init__(
        self,
        api: kube.Api,
        found: Callable[[], Awaitable[Iterable[problems.Problem]]],
        lease: kube.Lease | None,
        *,
        instance: str = "",
        poll_s: float = 5.0,
        refresh_s: float = 600.0,
        min_gap_s: float = 60.0,
        max_per_round: int = 20,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`found` gives the current problems (every analyzer's); `instance`
        is this replica's name, the Events' reportingInstance."""
        self._api = api
        self._found = found
        self._lease = lease
        self._instance = instance
        self._poll_s = poll_s
        self._refresh_s = refresh_s
        self._min_gap_s = min_gap_s
        self._max_per_round = max_per_round
        self._now = now
        self._clock = clock
        self._written: dict[Key, _Written] = {}
        # The keys of the problems of the last round.
        self._present: set[Key] = set()
        self.last = "not synced yet"

    async def _wanted(self) -> dict[Key, tuple[Target, str]]:
        """The Events the current problems call for: the object and message,
        by object and code."""
        try:
            found = list(await self._found())
        except Exception as err:
            # An analyzer's bug must not end the Events for good: it is
            # logged, and the next round runs them again.
            raise AnalysisFailed(f"the analyzers failed, the Events wait: {err!r}") from err
        grouped: dict[Key, tuple[Target, list[problems.Problem]]] = {}
        for problem in found:
            target = target_of(problem.subject)
            if target is None:
                continue
            key = (target.kind.kind, target.namespace, target.name, problem.code)
            grouped.setdefault(key, (target, []))[1].append(problem)
        return {key: (target, message(found)) for key, (target, found) in grouped.items()}

    async def sync(self) -> int:
        """Write the Events that are due; how many objects were looked at
        (each costs a read or two, and a write if its Event was due)."""
        wanted = await self._wanted()
        now = self._clock()
        for key, (_, text) in wanted.items():
            record = self._written.get(key)
            if record is not None and (key not in self._present or record.message != text):
                self._written[key] = dataclasses.replace(record, pending=True)
        self._present = set(wanted)
        handled = 0
        for key, (target, text) in sorted(wanted.items()):
            if handled >= self._max_per_round:
                break  # the rest next round
            record = self._written.get(key)
            if record is not None:
                since = now - record.at
                if since < self._refresh_s and not (record.pending and since >= self._min_gap_s):
                    continue
            handled += 1
            try:
                await self._write(key, target, text, record)
            except kube.Invalid as err:
                # This Event only, and tried again when it would be renewed:
                # the others are still written.
                log.warning("the API server refused the Event of %s: %s", target, err)
                self._written[key] = _Written("", 0, text, now)
        # What went away: its record stays (the problem may come back, and
        # its Event is then bumped) until it would be refreshed anyway.
        for key in [k for k, r in self._written.items() if k not in wanted]:
            if now - self._written[key].at >= self._refresh_s:
                del self._written[key]
        return handled

    async def _write(self, key: Key, target: Target, text: str, record: _Written | None) -> None:
        """Create the Event of `key`, or bring it up to date: its count goes
        up if the problem came back or says something new since."""
        try:
            obj: Mapping[str, Any] = await self._api.call(
                "GET", target.kind.path(target.namespace or None, target.name)
            )
        except kube.NotFound:
            return  # gone since the analysis: nothing to say it on
        meta = obj.get("metadata") or {}
        uid = meta.get("uid")
        uid = uid if isinstance(uid, str) else ""
        code = key[3]
        name = event_name(target, uid, code)
        if record is None or record.name != name:
            # First time here (or the object was made anew): what is there
            # already, from another replica or this one before a restart.
            record = await self._adopt(name, target, text)
            if record is not None and not record.pending:
                self._written[key] = record
                return
        stamp = _stamp(self._now())
        if record is not None:
            count = record.count + 1 if record.pending else record.count
            try:
                await self._api.call(
                    "PATCH",
                    self._path(target, name),
                    body={"count": count, "lastTimestamp": stamp, "message": text},
                    content_type="application/merge-patch+json",
                )
            except kube.NotFound:
                pass  # expired meanwhile (the TTL): a new one
            else:
                self._written[key] = _Written(name, count, text, self._clock())
                if record.pending:
                    log.info("event %s on %s again (x%d): %s", code, target, count, text)
                return
        kind = problems.BY_ID[code]
        body = {
            "apiVersion": API_VERSION,
            "kind": "Event",
            "metadata": {"name": name, "namespace": target.event_namespace},
            "involvedObject": {
                "apiVersion": target.kind.api_version,
                "kind": target.kind.kind,
                **({"namespace": target.namespace} if target.namespace else {}),
                "name": target.name,
                "uid": uid,
            },
            "reason": kind.name,
            "message": text,
            "type": "Normal" if kind.severity is problems.Severity.INFO else "Warning",
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self._instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self._api.call("POST", self._path(target), body=body)
        except kube.Conflict:
            return  # written meanwhile: read next round
        self._written[key] = _Written(name, 1, text, self._clock())
        log.info("event %s on %s: %s", code, target, text)

    async def _adopt(self, name: str, target: Target, text: str) -> _Written | None:
        """The Event of this name as found, None if there is none; pending
        if it is to be bumped (it says something else, or was last written
        long ago)."""
        try:
            found: Mapping[str, Any] = await self._api.call("GET", self._path(target, name))
        except kube.NotFound:
            return None
        count = found.get("count")
        last = _parse_stamp(found.get("lastTimestamp"))
        age = (self._now() - last).total_seconds() if last is not None else self._refresh_s
        return _Written(
            name,
            count if isinstance(count, int) and count > 0 else 1,
            str(found.get("message") or ""),
            self._clock() - max(age, 0.0),
            pending=found.get("message") != text or age >= self._refresh_s,
        )

    def _path(self, target: Target, name: str | None = None) -> str:
        return kube.resource_path(API_VERSION, PLURAL, target.event_namespace, name)

    async def run(self) -> None:
        while True:
            wait = self._poll_s
            try:
                # During an API server outage this takes its turn with every
                # watch, as one shared backoff allows.
                await self._api.backoff.wait_turn()
                holder = await self._lease.acquire() if self._lease is not None else None
                if holder is None:
                    await self.sync()
                    self._say("problems' Events are current")
                else:
                    # Another replica writes; when it is ours again, what it
                    # wrote is read before anything is bumped.
                    self._written.clear()
                    self._present.clear()
                    self._say(f"{holder} writes the problems' Events")
                    wait = max(wait, self._lease.duration_s / 3) if self._lease else wait
            except (kube.ApiError, aiohttp.ClientError, OSError) as err:
                self._say(f"cannot write the problems' Events: {err}")
            except AnalysisFailed as err:
                if str(err) != self.last:
                    log.error("%s", err, exc_info=err.__cause__)
                self.last = str(err)
            await asyncio.sleep(wait)

    def _say(self, what: str) -> None:
        if what != self.last:
            log.info("%s", what)
        self.last = what
