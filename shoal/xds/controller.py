"""Mesh states in, checked snapshots out to the cache, one push at a time.

The one module that joins the model and the cache: it debounces changes,
has what proxies share built once per push (`shared`), has each proxy's
generator pick and build its groups (`generators`), checks that every
reference resolves, and hands the snapshots to the cache.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from shoal.model import changes, mesh, problems, proxy
from shoal.xds import cache, debounce, generators, identities, memo, node, resources
from shoal.xds import shared as sharing

log = logging.getLogger(__name__)

# Reasons a push is made, as the log and status show them.
MESH_CHANGED = "mesh state"
CERTIFICATES = "certificates"


@dataclass(frozen=True, slots=True)
class Push:
    """One rebuild pushed to every proxy: what it was for."""

    number: int
    mesh_version: int
    reasons: collections.Counter[str]
    changes: changes.ChangeSet
    proxies: int
    seconds: float
    # From the first change of its burst until the rebuild began.
    debounce_seconds: float = 0.0
    # Proxies given their last snapshot with the moved endpoint groups
    # swapped in, rather than generated again.
    repointed: int = 0

    def as_dict(self) -> dict[str, object]:
        """For /debug/pushes."""
        return {
            "push": self.number,
            "mesh_version": self.mesh_version,
            "reasons": dict(self.reasons),
            "changed": self.changes.summary(),
            "proxies": self.proxies,
            "build_ms": round(self.seconds * 1000, 1),
            "debounce_ms": round(self.debounce_seconds * 1000, 1),
            "repointed": self.repointed,
        }

    def __str__(self) -> str:
        swapped = f" ({self.repointed} with endpoints swapped in)" if self.repointed else ""
        return (
            f"push {self.number} (mesh version {self.mesh_version}, "
            f"{debounce.describe(self.reasons)}): {self.changes.summary()}; "
            f"{self.proxies} proxies{swapped}, built in {self.seconds * 1000:.1f} ms"
        )


class Controller:
    def __init__(
        self,
        snapshots: cache.SnapshotCache,
        debouncer: debounce.Debouncer,
        certificates: identities.Identities | None = None,
        quiet_gc: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
    ) -> None:
        """`quiet_gc` keeps the garbage collector out of a rebuild, which
        adds a large, long-lived structure to the heap at once (see
        shoal/heap.py): a collection in a first build of ten thousand
        Services walks everything built so far, for nothing."""
        self._quiet_gc = quiet_gc
        self._cache = snapshots
        self._debouncer = debouncer
        self._secrets = None if certificates is None else identities.SecretGroups(certificates)
        self._trust_domain = None if certificates is None else certificates.trust_domain
        # Proxy keys per identity: its key material goes when the last one does.
        self._identity_users: collections.Counter[mesh.Identity] = collections.Counter()
        # (namespace, Pod) of connected captured sidecars, for the Pod index.
        self._captured_pods: collections.Counter[tuple[str, str]] = collections.Counter()
        self._state = mesh.MeshState()
        self._proxies: dict[str, proxy.Proxy] = {}
        self._memos = sharing.Memos()
        # Route groups known to resolve against a scope's clusters, by the
        # ids of their parts (kept in the entry); the names and refs of the
        # whole mesh's groups. Both for the last rebuild and this one.
        self._resolved: memo.Generations[tuple[int, ...], tuple[object, ...]] = memo.Generations()
        self._group_sets: memo.Generations[
            tuple[int],
            tuple[cache.ResourceGroup, frozenset[tuple[str, str]], frozenset[tuple[str, str]]],
        ] = memo.Generations()
        self._own = generators.Own()
        self._shared: sharing.Shared | None = None
        # The state last pushed, and the pushes since start (the last few).
        self._pushed_state = mesh.MeshState()
        self._pushes = 0
        self.recent_pushes: collections.deque[Push] = collections.deque(maxlen=32)
        # No configuration before the first mesh state: a proxy that connects
        # while the registry is still listing waits, rather than being given
        # an empty mesh that would drop its traffic.
        self._started = False
        self.problems: list[problems.Problem] = []
        self.last_build_seconds = 0.0
        # When (time.time) the mesh state last changed, for analyzers.
        self.changed_at_wall = 0.0
        # When (time.monotonic) the change the current push answers began;
        # carried by its snapshots, so the server can time ACKs from it.
        self._changed_at = 0.0
        # Told of every push once it is published (metrics); must be quick.
        self.on_push: Callable[[Push], None] = lambda _: None
        snapshots.on_watch = self._on_watch
        snapshots.on_idle = self._on_idle

    @staticmethod
    def key_of(client: cache.Client) -> str:
        return node.key(node.parse(client.node, client.identity))

    @property
    def state(self) -> mesh.MeshState:
        return self._state

    def proxy_of(self, key: str) -> proxy.Proxy | None:
        """What the proxies reading `key` stand for."""
        return self._proxies.get(key)

    def kind_of(self, key: str) -> str:
        """What kind of proxy reads `key`: sidecar (local), captured (a
        Pod's, iptables), proxyless (gRPC); "" for one not placed."""
        found = self._proxies.get(key)
        if isinstance(found, proxy.CapturedSidecar):
            return "captured"
        if isinstance(found, proxy.Proxyless):
            return "proxyless"
        return "" if found is None else "sidecar"

    def update(self, state: mesh.MeshState) -> None:
        """A new mesh state; pushed after the debounce."""
        self._state = state
        self._started = True
        self.changed_at_wall = time.time()
        self._debouncer.touch(MESH_CHANGED)

    def refresh(self, reason: str = CERTIFICATES) -> None:
        """Something outside the mesh state changed (a certificate): rebuild."""
        self._debouncer.touch(reason)

    async def run(self) -> None:
        while True:
            reasons = await self._debouncer.settled()
            try:
                self.rebuild(reasons, waited=self._debouncer.waited)
            except Exception:
                log.exception("rebuild of mesh version %d failed", self._state.version)

    # -- proxies coming and going -------------------------------------------

    def _on_watch(self, key: str, client: cache.Client) -> None:
        if key in self._proxies:
            return
        found = self._proxies[key] = node.parse(client.node, client.identity)
        if isinstance(found, proxy.CapturedSidecar):
            self._captured_pods[found.pod_key] += 1
        if isinstance(found, proxy.Sidecar | proxy.CapturedSidecar):
            self._identity_users[found.identity] += 1
        if not self._started:
            return
        if self._shared is None or self._shared.state is not self._state:
            self._shared = self._build_shared(self._state)
        if self._shared.whole:
            self._publish(key, found, self._context(self._shared))

    def _on_idle(self, key: str) -> None:
        gone = self._proxies.pop(key, None)
        if gone is not None:
            self._own.forget(gone)
        if self._shared is not None:
            self._shared.published.pop(key, None)
        if isinstance(gone, proxy.CapturedSidecar):
            pod = gone.pod_key
            self._captured_pods[pod] -= 1
            if self._captured_pods[pod] <= 0:
                del self._captured_pods[pod]
        self._cache.clear_snapshot(key)
        if isinstance(gone, proxy.Sidecar | proxy.CapturedSidecar):
            identity = gone.identity
            self._identity_users[identity] -= 1
            if self._identity_users[identity] <= 0:
                del self._identity_users[identity]
                if self._secrets is not None:
                    self._secrets.forget(identity)

    # -- building -------------------------------------------------------------

    def rebuild(
        self, reasons: collections.Counter[str] | None = None, *, waited: float = 0.0
    ) -> None:
        """Build and publish every proxy's snapshot; `waited`: how long the
        change waited in the debounce before this."""
        if not self._started:
            return
        with self._quiet_gc():
            self._rebuild(reasons, waited)

    def _rebuild(self, reasons: collections.Counter[str] | None, waited: float) -> None:
        state = self._state
        started = time.perf_counter()
        self._changed_at = time.monotonic() - waited
        self.problems = []
        before = self._shared
        shared = self._shared = self._build_shared(state)
        repointed = 0
        if shared.whole:
            context = self._context(shared)
            replaced = None if before is None else self._replacing(before, shared, reasons)
            if before is None or replaced is None:
                for key, p in self._proxies.items():
                    self._publish(key, p, context)
            else:
                last = before.published
                for key, p in self._proxies.items():
                    found = last.get(key)
                    if found is not None and found[0] is p:
                        self._repoint(key, p, found[1], replaced, shared)
                        repointed += 1
                    else:
                        self._publish(key, p, context)
        self.last_build_seconds = time.perf_counter() - started
        self._pushes += 1
        push = Push(
            number=self._pushes,
            mesh_version=state.version,
            reasons=reasons or collections.Counter({MESH_CHANGED: 1}),
            changes=changes.between(self._pushed_state, state),
            proxies=len(self._proxies),
            seconds=self.last_build_seconds,
            debounce_seconds=waited,
            repointed=repointed,
        )
        if shared.whole:
            self._pushed_state = state
        self.recent_pushes.append(push)
        log.info("%s", push)
        self.on_push(push)

    def _build_shared(self, state: mesh.MeshState) -> sharing.Shared:
        before = self._shared
        self._own.advance(before is not None and generators.sidecar_own_holds(before.state, state))
        shared = sharing.build(state, self._memos, self._trust_domain)
        self._resolved.advance()
        self._group_sets.advance()
        everything = shared.scoped_groups(None)
        only_shared = cache.Snapshot(
            {resources.CLUSTER: (everything[0],), resources.ENDPOINT: (everything[1],)}
        )
        shared.whole = self._report(f"mesh version {state.version}", self._resolve(only_shared))
        if shared.whole:
            shared.verified |= {id(everything[0]), id(everything[1])}
            self._memos.publishing()
        return shared

    def _replacing(
        self,
        before: sharing.Shared,
        shared: sharing.Shared,
        reasons: collections.Counter[str] | None,
    ) -> dict[int, cache.ResourceGroup] | None:
        """The groups to swap in the snapshots made from `before`, when only
        endpoints moved (most pushes); None when each proxy's configuration
        must be generated again. A swap costs a proxy a few microseconds,
        where generating and checking it costs tens: with a thousand
        proxies, that was most of the time before the first response."""
        if reasons and set(reasons) != {MESH_CHANGED}:
            return None  # certificates are read by generating
        moved = shared.state.endpoints_moved_since(before.state)
        if moved is None or not generators.endpoints_reach_only_scoped_groups(
            before.state, shared.state, moved, self._captured_pods
        ):
            return None
        replaced = shared.replacing(before)
        if replaced is not None:
            # What the last rebuild kept is what the next one may use.
            self._memos.carry()
            self._resolved.carry()
            self._group_sets.carry()
        return replaced

    def _repoint(
        self,
        key: str,
        p: proxy.Proxy,
        last: sharing.Groups,
        replaced: dict[int, cache.ResourceGroup],
        shared: sharing.Shared,
    ) -> None:
        """The `last` groups with the replaced endpoint groups swapped: they
        resolved, and each replacement names what the group it replaces
        named."""
        groups = dict(last)
        found = groups.get(resources.ENDPOINT)
        if found:
            groups[resources.ENDPOINT] = tuple([replaced.get(id(g), g) for g in found])
        snapshot = self._snapshot(groups, shared)
        shared.published[key] = (p, groups)
        self._cache.set_snapshot(key, snapshot)

    def _snapshot(self, groups: sharing.Groups, shared: sharing.Shared) -> cache.Snapshot:
        return cache.Snapshot(
            groups=groups,
            label=shared.label,
            changed_at=self._changed_at,
        )

    def _context(self, shared: sharing.Shared) -> generators.Context:
        return generators.Context(shared, self._own, self._secrets, self._captured_pods)

    # -- one proxy --------------------------------------------------------------

    def _publish(self, key: str, p: proxy.Proxy, context: generators.Context) -> None:
        shared = context.shared
        generator = generators.of(p)
        in_scope = shared.scope(p.namespace, generator.dependencies(p, context))
        try:
            groups = generator.generate(p, context, in_scope)
        except generators.Unconfigurable as err:
            self.problems.append(problems.Problem("proxy", key, str(err), "SHL0405"))
            log.warning("not configuring proxy %s: %s", key, err)
            return
        scoped_clusters, route_group = groups[resources.CLUSTER][0], groups[resources.ROUTE][0]
        if id(route_group) not in shared.verified and self._routes_resolve(
            scoped_clusters, route_group, shared
        ):
            shared.verified.add(id(route_group))
        snapshot = self._snapshot(groups, shared)
        if self._check(key, snapshot, skip=shared.verified):
            shared.published[key] = (p, groups)
            self._cache.set_snapshot(key, snapshot)

    def _routes_resolve(
        self,
        scoped_clusters: cache.ResourceGroup,
        route_group: cache.ResourceGroup,
        shared: sharing.Shared,
    ) -> bool:
        """Whether a scope's routes name only its clusters. Remembered by
        what it depends on, the routes' refs and the clusters (a route table
        whose hosts changed but name the same clusters is not walked again:
        at ten thousand Services that is ten thousand lookups per table)."""
        key = (id(scoped_clusters), *(id(r.refs) for r in route_group))
        if self._resolved.get(key) is not None:
            return True
        if self._resolve(
            cache.Snapshot(
                {resources.CLUSTER: (scoped_clusters,), resources.ROUTE: (route_group,)}
            ),
            shared.verified,
        ):
            return False
        # The objects are kept with the entry, so that their ids stay theirs.
        self._resolved.put(key, (scoped_clusters, *(r.refs for r in route_group)))
        return True

    def _resolve(
        self, snapshot: cache.Snapshot, skip: Collection[int] = ()
    ) -> list[tuple[str, str]]:
        """`unresolved` for groups of ten thousand, with sets: the names and
        the refs of each group are worked out once per group (and kept for
        the next rebuild), then compared at C speed."""
        whole = tuple(id(g) for groups in snapshot.groups.values() for g in groups)
        if not skip and self._resolved.get(whole) is not None:
            return []  # the very groups, found whole before
        have: set[tuple[str, str]] = set()
        wanted: set[tuple[str, str]] = set()
        for type_url, groups in snapshot.groups.items():
            for group in groups:
                found = self._group_sets.get((id(group),))
                if found is None:
                    found = self._group_sets.put(
                        (id(group),),
                        (
                            group,
                            frozenset([(type_url, r.name) for r in group]),
                            frozenset().union(*[r.refs for r in group]),
                        ),
                    )
                have |= found[1]
                if id(group) not in skip:
                    wanted |= found[2]
        missing = sorted(r for r in wanted - have if r[0] in snapshot.groups)
        if not skip and not missing:
            # The groups are kept with the entry, so that their ids stay theirs.
            self._resolved.put(
                whole, tuple(g for groups in snapshot.groups.values() for g in groups)
            )
        return missing

    def publish(self, key: str, snapshot: cache.Snapshot) -> bool:
        """Hand a snapshot to the cache if it is whole; else keep the last one."""
        if not self._check(key, snapshot, skip=frozenset()):
            return False
        self._cache.set_snapshot(key, snapshot)
        return True

    def _check(self, subject: str, snapshot: cache.Snapshot, skip: AbstractSet[int]) -> bool:
        return self._report(subject, unresolved(snapshot, skip))

    def _report(self, subject: str, missing: list[tuple[str, str]]) -> bool:
        if not missing:
            return True
        reason = "refers to missing " + ", ".join(
            f"{resources.short(t)} {n}" for t, n in missing[:5]
        )
        self.problems.append(problems.Problem("translation", subject, reason, "SHL0405"))
        log.error("not publishing %s: %s; proxies keep their last config", subject, reason)
        return False


def unresolved(
    snapshot: cache.Snapshot, skip: AbstractSet[int] = frozenset()
) -> list[tuple[str, str]]:
    """Every reference in the snapshot that names nothing in it, leaving out
    groups (by id) already known to resolve."""
    missing: set[tuple[str, str]] = set()
    for groups in snapshot.groups.values():
        for group in groups:
            if id(group) in skip:
                continue
            for r in group:
                for ref in r.refs:
                    # A partial snapshot (the shared groups alone) is checked
                    # only for the types it has; secrets are per proxy.
                    if ref[0] in snapshot.groups and snapshot.get(*ref) is None:
                        missing.add(ref)
    return sorted(missing)
