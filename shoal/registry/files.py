"""A folder of Kubernetes manifests as the mesh registry, hot-reloaded.

Each file is applied as a unit: if any document in it is broken, the file's
last good objects stay in force (a half-applied file is how a typo in one
Service takes out its neighbours), and every error is reported with the file,
the document index and the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import yaml

from shoal.model import mesh, problems
from shoal.registry import manifests, problemlog, store

log = logging.getLogger(__name__)

SUFFIXES = (".yaml", ".yml")
# libyaml when present: ten times faster on a folder of thousands of files.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# How long the watcher waits for a first change before it says it is armed.
_ARMED_WITHIN_MS = 200


def _manifest_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix in SUFFIXES and p.is_file() and not p.name.startswith(".")
    )


def _fingerprint(root: Path) -> tuple[tuple[str, bytes], ...]:
    """What the folder's manifests say, by content (timestamps are too
    coarse to tell two writes in one clock tick apart)."""
    out = []
    for path in _manifest_files(root):
        try:
            digest = hashlib.blake2b(path.read_bytes(), digest_size=16).digest()
        except OSError:
            continue
        out.append((str(path), digest))
    return tuple(out)


def load_file(
    path: Path, label: str, check: Callable[[manifests.KubeObject], None]
) -> tuple[list[store.Sourced], list[problems.Problem]]:
    """Parse one file into objects the mesh reads, and the problems found;
    `check` (the store's) says what is wrong with an object on its own."""
    found: list[problems.Problem] = []
    objects: list[store.Sourced] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return [], [problems.Problem(label, "file", f"cannot read: {err}", "SHL0001")]
    docs: list[object] = []
    try:
        for doc in yaml.load_all(text, Loader=_LOADER):
            docs.append(doc)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or str(err)
        found.append(
            problems.Problem(
                f"{label}#{len(docs)}", "document", f"invalid YAML{where}: {reason}", "SHL0001"
            )
        )
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        source = f"{label}#{index}"
        try:
            obj = manifests.parse_object(doc)
            if obj is None:
                assert isinstance(doc, dict)
                log.info(
                    "ignoring %s %s in %s (not a kind the mesh reads)",
                    doc.get("apiVersion"),
                    doc.get("kind"),
                    source,
                )
                continue
            check(obj)
        except manifests.ManifestError as err:
            kind = (doc.get("apiVersion"), doc.get("kind")) if isinstance(doc, dict) else ("", "")
            found.append(
                problems.Problem(
                    source, manifests.describe(doc), str(err), store.code_of(kind, err)
                )
            )
            continue
        objects.append(store.Sourced(obj, source))
    return objects, found


class FolderRegistry:
    """Keeps a folder's objects in an ObjectStore and the problems of each file."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._store = store.ObjectStore()
        self._file_problems: dict[str, list[problems.Problem]] = {}
        self._build_problems: list[problems.Problem] = []
        self._problem_log = problemlog.ProblemLog(log, "manifest error")
        self._state = mesh.MeshState()
        # Set once the folder is watched and was read again after that.
        self.armed = asyncio.Event()
        self._loaded: tuple[tuple[str, bytes], ...] = ()
        # Reads of the folder (whole, or the files that changed), and those
        # that failed, for metrics.
        self.reloads = 0
        self.reload_failures = 0

    @property
    def state(self) -> mesh.MeshState:
        return self._state

    def ready(self) -> tuple[bool, str]:
        """A folder is read before anything is served."""
        return True, "ready"

    @property
    def problems(self) -> list[problems.Problem]:
        out = [p for ps in self._file_problems.values() for p in ps]
        return sorted(out) + self._build_problems

    def _label(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def load(self) -> mesh.MeshState:
        """Read the whole folder (first start, or when the watcher lost track)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"registry folder {self.root} does not exist")
        self.reloads += 1
        self._loaded = _fingerprint(self.root)
        present = {self._label(p): p for p in _manifest_files(self.root)}
        for gone in set(self._store.sources()) | set(self._file_problems):
            if gone not in present:
                self._forget(gone)
        for label, path in present.items():
            self._load(label, path)
        return self._rebuild()

    def reload(self, paths: set[Path]) -> mesh.MeshState:
        self.reloads += 1
        for path in paths:
            if path.suffix not in SUFFIXES:
                continue
            label = self._label(path)
            if path.is_file():
                self._load(label, path)
            else:
                self._forget(label)
        return self._rebuild()

    def _forget(self, label: str) -> None:
        self._store.replace_source(label, ())
        self._file_problems.pop(label, None)
        log.info("manifest %s removed", label)

    def _load(self, label: str, path: Path) -> None:
        objects, found = load_file(path, label, self._store.check)
        self._file_problems[label] = found
        if not found:
            self._store.replace_source(label, objects)
            return
        if label in self._store.sources():
            kept = "the file's last good version stays in force"
        else:
            kept = "its valid documents apply"
            self._store.replace_source(label, objects)
        # What the user sees must say what traffic still follows.
        self._file_problems[label] = found = [
            dataclasses.replace(p, reason=f"{p.reason}; {kept}") for p in found
        ]
        for problem in found:
            log.warning("manifest error: %s", problem)

    def _rebuild(self) -> mesh.MeshState:
        self._state, self._build_problems = self._store.build()
        self._problem_log.update(self._build_problems)
        return self._state

    def read(self, paths: list[Path]) -> mesh.MeshState:
        """Read the given files and folders once (`shoal analyze -f`), each
        file labelled by its path as given."""
        for given in paths:
            if given.is_dir():
                for path in _manifest_files(given):
                    self._load(str(path), path)
            elif given.is_file():
                self._load(str(given), given)
            else:
                raise FileNotFoundError(f"{given} does not exist")
        return self._rebuild()

    async def watch(self, on_change: Callable[[mesh.MeshState], None], stop: asyncio.Event) -> None:
        """Reload on every change under the folder until `stop` is set."""
        import watchfiles

        # watchfiles' default 1.6 s debounce would miss the 1 s edit-to-live
        # goal; the controller debounces bursts of changes anyway. watchfiles
        # looks for events every `step` and hands them over one quiet step
        # later: 5 ms (not 20) takes about 25 ms off every change, for
        # about 5 ms of CPU a second while idle. Its first
        # answer, a change or a quiet `rust_timeout`, comes once the watcher
        # is armed: the folder is read again then, since a file written
        # between the first load and that moment raised no event.
        async for changes in watchfiles.awatch(
            self.root,
            debounce=50,
            step=5,
            stop_event=stop,
            recursive=True,
            rust_timeout=_ARMED_WITHIN_MS,
            yield_on_timeout=True,
        ):
            if not changes and self.armed.is_set():
                continue
            try:
                if not self.armed.is_set():
                    if _fingerprint(self.root) != self._loaded:
                        on_change(self.load())
                    self.armed.set()
                else:
                    on_change(self.reload({Path(p) for _, p in changes}))
            except Exception:
                self.reload_failures += 1
                log.exception("reloading %s failed; keeping the last state", self.root)
