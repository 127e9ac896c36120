"""What kubelet does with a Pod the API server admitted, for end-to-end tests
on a `tests.netns.Node`: the Pod's network namespace (what the CNI plugin
makes), its status.podIP, the projected service-account token (a
TokenRequest), its init containers run to completion in order, its native
sidecars (init containers with `restartPolicy: Always`) started and waited
for until their startup probe passes, then its app containers.

Containers run the commands of the Pod as the API server stored it (after
admission), with their downward-API environment resolved from the Pod
object as kubelet resolves it ("Expose Pod Information to Containers
Through Environment Variables", Kubernetes docs). There are no images: an
executable named by a command (`shoal`) is mapped to the one installed here,
and paths under a container's volume mounts are mapped to folders of the
test (no mount namespaces: the agent is told the folders by its flags and
environment, which carry the mounted paths).

Kubernetes docs cited: "Sidecar Containers" (native sidecars start in order
with the init containers and must pass their startup probe before the next
container starts), "Projected Volumes" (serviceAccountToken: audience,
expirationSeconds, path), "Configure Liveness, Readiness and Startup
Probes" (kubelet calls an httpGet probe at the Pod's IP).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import netns

JSON = dict[str, Any]
# What a container's process finds on PATH (iptables-restore is in /usr/sbin).
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def field_ref(pod: Mapping[str, Any], path: str) -> str:
    """A downward-API fieldRef's value (the fields kubelet supports for env)."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    simple = {
        "metadata.name": metadata.get("name"),
        "metadata.namespace": metadata.get("namespace"),
        "metadata.uid": metadata.get("uid"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "spec.nodeName": spec.get("nodeName"),
        "status.podIP": status.get("podIP"),
        "status.hostIP": status.get("hostIP"),
    }
    if path in simple:
        value = simple[path]
        return "" if value is None else str(value)
    for prefix, mapping in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
        if path.startswith(prefix + "['") and path.endswith("']"):
            return str((metadata.get(mapping) or {}).get(path[len(prefix) + 2 : -2], ""))
    raise ValueError(f"fieldRef {path!r} is not one kubelet resolves here")


def environment(pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
    """The container's env with fieldRefs resolved from the Pod object."""
    env: dict[str, str] = {}
    for entry in container.get("env") or ():
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
            continue
        ref = (entry.get("valueFrom") or {}).get("fieldRef")
        if ref is None:
            raise ValueError(f"env {entry['name']} comes from something other than a fieldRef")
        env[entry["name"]] = field_ref(pod, ref["fieldPath"])
    return env


def init_container(pod: Mapping[str, Any], name: str) -> JSON:
    for container in pod["spec"].get("initContainers") or ():
        if container["name"] == name:
            found: JSON = container
            return found
    raise KeyError(f"Pod {pod['metadata']['name']} has no init container {name}")


def is_sidecar(container: Mapping[str, Any]) -> bool:
    """A native sidecar: an init container that keeps running."""
    return container.get("restartPolicy") == "Always"


@dataclass(frozen=True)
class TokenVolume:
    """A projected serviceAccountToken source, where the container sees it."""

    volume: str
    audience: str
    expiration_s: int
    path: str  # inside the volume


def token_volume(pod: Mapping[str, Any], name: str) -> TokenVolume:
    for volume in pod["spec"].get("volumes") or ():
        if volume["name"] != name:
            continue
        for source in (volume.get("projected") or {}).get("sources") or ():
            token = source.get("serviceAccountToken")
            if token is not None:
                return TokenVolume(
                    name,
                    # "Projected Volumes": the audience defaults to the API server's.
                    token.get("audience", ""),
                    int(token.get("expirationSeconds", 3600)),
                    token["path"],
                )
    raise KeyError(f"Pod {pod['metadata']['name']} has no serviceAccountToken volume {name}")


def mounted(container: Mapping[str, Any], volume: str) -> str:
    for mount in container.get("volumeMounts") or ():
        if mount["name"] == volume:
            path: str = mount["mountPath"]
            return path
    raise KeyError(f"container {container['name']} does not mount {volume}")


def remap(value: str, mounts: Mapping[str, Path]) -> str:
    """`value` with a mounted path (a mountPath, or under one) replaced by
    the test's folder for that volume."""
    for mount_path, folder in mounts.items():
        if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
            return str(folder) + value[len(mount_path.rstrip("/")) :]
    return value


def command(
    container: Mapping[str, Any], executables: Mapping[str, str], mounts: Mapping[str, Path]
) -> list[str]:
    """The container's command and args, its executable mapped to the one
    installed here and mounted paths to the test's folders."""
    argv = [*(container.get("command") or ()), *(container.get("args") or ())]
    if not argv:
        raise ValueError(f"container {container['name']} has no command (an image's entrypoint)")
    if argv[0] not in executables:
        raise ValueError(f"no executable for {argv[0]!r} of container {container['name']}")
    return [executables[argv[0]], *(remap(a, mounts) for a in argv[1:])]


def probe_url(pod_ip: str, probe: Mapping[str, Any]) -> str:
    """Where kubelet sends an httpGet probe with a numeric port."""
    get = probe["httpGet"]
    scheme = str(get.get("scheme", "HTTP")).lower()
    return f"{scheme}://{get.get('host') or pod_ip}:{int(get['port'])}{get.get('path', '/')}"


def call_probe(node: netns.Node, url: str, timeout: float = 2) -> int:
    """An httpGet probe as kubelet sends it, from the node: the status, 0
    when nothing answered."""

    def get() -> int:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return int(err.code)
        except OSError:
            return 0

    return node.inside(get, timeout=timeout + 10)


@dataclass
class RunningPod:
    """A Pod kubelet runs on the node: its network, folders and processes."""

    name: str
    namespace: str
    network: netns.Pod
    folder: Path
    # Volume name -> the test's folder for it.
    volumes: dict[str, Path] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return self.network.ip

    def log(self, container: str) -> str:
        path = self.logs.get(container)
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def exited(self, container: str) -> int | None:
        return self.processes[container].poll()


class Kubelet:
    """Runs Pods, as admitted by the API server, on `node`.

    `api(args, stdin)` runs kubectl against the API server and returns its
    output;
    `set_status(namespace, name, status)` writes a Pod's status (what
    kubelet PATCHes to pods/NAME/status). Folders are made under a folder of
    its own (mode 0755, so the proxy's user may enter) and removed by
    `close`."""

    def __init__(
        self,
        node: netns.Node,
        api: Callable[[Sequence[str], str | None], str],
        set_status: Callable[[str, str, JSON], None],
        executables: Mapping[str, str],
        *,
        proxy_gid: int = netns.PROXY_UID,
    ) -> None:
        self.node = node
        self.api = api
        self.set_status = set_status
        self.executables = dict(executables)
        self.proxy_gid = proxy_gid
        self.folder = Path(tempfile.mkdtemp(prefix="shoal-kubelet-"))
        os.chmod(self.folder, 0o755)
        self.pods: list[RunningPod] = []

    def close(self) -> None:
        """Every container stopped, every folder removed (the node's teardown
        removes the Pods' namespaces)."""
        for running in self.pods:
            for name in running.processes:
                self.stop(running, name)
        shutil.rmtree(self.folder, ignore_errors=True)

    def get(self, namespace: str, name: str) -> JSON:
        pod: JSON = json.loads(self.api(["get", "pod", name, "-n", namespace, "-o", "json"], None))
        return pod

    def sandbox(self, namespace: str, name: str, ip: str) -> tuple[JSON, RunningPod]:
        """The Pod's network namespace and folders, and its IP in its status,
        as kubelet has them before any container starts."""
        network = self.node.pod(name, ip, namespace=namespace)
        folder = self.folder / f"{namespace}-{name}"
        folder.mkdir()
        os.chmod(folder, 0o755)
        running = RunningPod(name, namespace, network, folder)
        self.pods.append(running)
        self.set_status(namespace, name, {"phase": "Pending", "podIP": ip, "podIPs": [{"ip": ip}]})
        return self.get(namespace, name), running

    def project_token(self, pod: JSON, running: RunningPod, volume: str) -> Path:
        """The serviceAccountToken volume's file, from a TokenRequest bound
        to the Pod (by name and uid), as kubelet refreshes it."""
        source = token_volume(pod, volume)
        metadata = pod["metadata"]
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [source.audience],
                "expirationSeconds": source.expiration_s,
                "boundObjectRef": {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": metadata["name"],
                    "uid": metadata["uid"],
                },
            },
        }
        account = pod["spec"].get("serviceAccountName") or "default"
        uri = f"/api/v1/namespaces/{metadata['namespace']}/serviceaccounts/{account}/token"
        answer = json.loads(self.api(["create", "--raw", uri, "-f", "-"], json.dumps(request)))
        token: str = answer["status"]["token"]
        folder = running.folder / volume
        folder.mkdir(exist_ok=True)
        os.chmod(folder, 0o755)
        path = folder / source.path
        path.write_text(token)
        # Projected files are readable by the Pod's fsGroup; the proxy's here.
        os.chmod(path, 0o640)
        os.chown(path, 0, self.proxy_gid)
        running.volumes[volume] = folder
        return path

    def empty_dir(self, running: RunningPod, volume: str) -> Path:
        folder = running.folder / volume
        folder.mkdir(exist_ok=True)
        os.chmod(folder, 0o755)
        running.volumes[volume] = folder
        return folder

    def _mounts(self, container: Mapping[str, Any], running: RunningPod) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or ():
            if mount["name"] in running.volumes:
                out[mount["mountPath"]] = running.volumes[mount["name"]]
        return out

    def _env(self, pod: JSON, container: Mapping[str, Any], running: RunningPod) -> dict[str, str]:
        mounts = self._mounts(container, running)
        env = {k: remap(v, mounts) for k, v in environment(pod, container).items()}
        return {"PATH": PATH, **env}

    def run_init(self, pod: JSON, running: RunningPod, name: str) -> str:
        """An init container run to completion, as root in the Pod's network
        (it asks for NET_ADMIN); its output. RuntimeError if it fails."""
        container = init_container(pod, name)
        argv = command(container, self.executables, self._mounts(container, running))
        context = container.get("securityContext") or {}
        result = subprocess.run(
            running.network.command(
                argv, uid=context.get("runAsUser", 0), gid=context.get("runAsGroup", 0)
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env=self._env(pod, container, running),
        )
        if result.returncode != 0:
            raise RuntimeError(f"init container {name} failed: {result.stderr}")
        return result.stdout + result.stderr

    def start(
        self,
        pod: JSON,
        running: RunningPod,
        name: str,
        *,
        argv: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        uid: int | None = None,
        gid: int | None = None,
    ) -> subprocess.Popen[Any]:
        """Start a container (an init container with restartPolicy Always, or
        an app container whose image's program the test gives as `argv`) in
        the Pod's network, its output to a log file."""
        containers = [*(pod["spec"].get("initContainers") or ()), *pod["spec"]["containers"]]
        container = next(c for c in containers if c["name"] == name)
        mounts = self._mounts(container, running)
        if argv is None:
            argv = command(container, self.executables, mounts)
        log = running.folder / f"{name}.log"
        running.logs[name] = log
        with open(log, "wb") as out:
            proc = running.network.spawn(
                *argv,
                *extra_args,
                uid=uid,
                gid=gid,
                env=self._env(pod, container, running),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        running.processes[name] = proc
        return proc

    def stop(self, running: RunningPod, name: str) -> None:
        proc = running.processes[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


@contextlib.contextmanager
def kubelet(
    node: netns.Node,
    api: Callable[[Sequence[str], str | None], str],
    set_status: Callable[[str, str, JSON], None],
    executables: Mapping[str, str],
) -> Iterator[Kubelet]:
    made = Kubelet(node, api, set_status, executables)
    try:
        yield made
    finally:
        made.close()
