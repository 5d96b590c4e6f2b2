"""Plays a rendered Kubernetes Indexed Job with podman: each pod a real container of the tljob image.

Everything a pod gets comes from the rendered Job, as the kubelet would apply it: the container's
command, args and env; the pod's and container's securityContext (user, group, read-only root,
dropped capabilities, no privilege escalation); the resource limits (--cpus, --memory); the volumes
(emptyDirs as fresh host folders or, for medium Memory, tmpfs; the ConfigMap's items as read-only
files); the termination grace period (podman stop -t); and the pod's DNS name
`<job>-<index>.<subdomain>` as a network alias on the test's own podman network. Exits are handled
as the Job's podFailurePolicy and backoffLimitPerIndex say, with a fresh pod (fresh emptyDirs) for
every restart, started only once the old one is gone (podReplacementPolicy: Failed).

Only the endpoint of the GCS emulator (`extra_env`) and JOB_COMPLETION_INDEX (Kubernetes sets it)
are added; nothing is taken from the host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

CONTAINERS_CONF = Path(__file__).resolve().parents[1] / "container" / "containers.conf"
_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_BINARY = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result


def cpus(quantity: str) -> str:
    """A Kubernetes CPU quantity ("6", "500m") as podman's --cpus."""
    return str(int(quantity[:-1]) / 1000) if quantity.endswith("m") else quantity


def memory_bytes(quantity: str) -> int:
    match = _QUANTITY.match(quantity)
    if not match or match.group(2) not in _BINARY:
        raise ValueError(f"memory quantity {quantity!r} not understood")
    return int(float(match.group(1)) * _BINARY[match.group(2)])


def container_flags(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """podman run flags for the pod's and container's securityContext and resources."""
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
    user, group = sc.get("runAsUser", pod_sc.get("runAsUser")), sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    flags = []
    if user is not None:
        flags += ["--user", f"{user}:{group}" if group is not None else str(user)]
    if sc.get("readOnlyRootFilesystem"):
        # podman would otherwise mount tmpfs on /tmp, /run and /var/tmp: only the pod's volumes are writable.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    for cap in sc.get("capabilities", {}).get("drop", []):
        flags += ["--cap-drop", cap]
    for cap in sc.get("capabilities", {}).get("add", []):
        flags += ["--cap-add", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if sc.get("privileged"):
        flags += ["--privileged"]
    limits = container.get("resources", {}).get("limits", {})
    if "cpu" in limits:
        flags += ["--cpus", cpus(str(limits["cpu"]))]
    if "memory" in limits:
        flags += ["--memory", str(memory_bytes(str(limits["memory"])))]
    return flags


def volume_flags(pod: dict[str, Any], container: dict[str, Any], config_maps: dict[str, dict[str, str]],
                 pod_dir: Path) -> list[str]:
    """Each volumeMount as the volume type says: emptyDir (disk) a fresh 0777 folder, as the kubelet makes
    it; emptyDir (Memory) a tmpfs of its sizeLimit; configMap its items as files, read-only."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    flags = []
    for mount in container.get("volumeMounts", []):
        volume, target = volumes[mount["name"]], mount["mountPath"]
        ro = ",ro" if mount.get("readOnly") else ""
        if "emptyDir" in volume and volume["emptyDir"].get("medium") == "Memory":
            size = memory_bytes(volume["emptyDir"].get("sizeLimit", "64Mi"))
            flags += ["--mount", f"type=tmpfs,destination={target},tmpfs-size={size},tmpfs-mode=1777{ro}"]
        elif "emptyDir" in volume:
            folder = pod_dir / mount["name"]
            folder.mkdir(parents=True)
            folder.chmod(0o777)
            flags += ["--mount", f"type=bind,source={folder},destination={target}{ro}"]
        elif "configMap" in volume:
            data = config_maps[volume["configMap"]["name"]]
            folder = pod_dir / mount["name"]
            folder.mkdir(parents=True)
            items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                (folder / item["path"]).write_text(data[item["key"]])
                (folder / item["path"]).chmod(0o644)
            flags += ["--mount", f"type=bind,source={folder},destination={target},ro"]
        else:
            raise ValueError(f"volume {mount['name']}: type not played by this test: {sorted(volume)}")
    return flags


@dataclass
class Exit:
    index: int
    attempt: int
    code: int
    action: str
    at: float  # time.monotonic()


@dataclass
class IndexedJobPlayer:
    """One rendered Indexed Job, played with podman on `network`; `run()` until every index succeeded."""

    job: dict[str, Any]
    config_maps: dict[str, dict[str, str]]
    image: str
    network: str
    work_dir: Path
    extra_env: dict[str, str]
    name: str = field(default_factory=lambda: f"tljob-pod-{uuid.uuid4().hex[:6]}")
    exits: list[Exit] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)  # every container started, in order

    def __post_init__(self) -> None:
        self.spec = self.job["spec"]
        self.pod = self.spec["template"]["spec"]
        (self.container,) = self.pod["containers"]
        self.count = self.spec["completions"]
        self.attempts = dict.fromkeys(range(self.count), 0)
        self.failures = dict.fromkeys(range(self.count), 0)
        self.current: dict[int, str] = {}
        self.done: set[int] = set()

    def dns_name(self, index: int) -> str:
        """The pod's name in the headless Service: hostname <job>-<index>, subdomain = the Service."""
        return f"{self.job['metadata']['name']}-{index}.{self.pod['subdomain']}"

    def container_name(self, index: int) -> str:
        return f"{self.name}-{index}-{self.attempts[index]}"

    def start(self, index: int) -> None:
        self.attempts[index] += 1
        name = self.container_name(index)
        pod_dir = self.work_dir / name
        env = {e["name"]: e["value"] for e in self.container.get("env", [])}
        if any("valueFrom" in e for e in self.container.get("env", [])):
            raise ValueError("env valueFrom is not played by this test")
        env.update({"JOB_COMPLETION_INDEX": str(index), **self.extra_env})
        env_flags = [flag for key, value in env.items() for flag in ("--env", f"{key}={value}")]
        command = self.container.get("command", [])
        podman(
            "run", "--detach", "--name", name, "--network", self.network,
            "--hostname", f"{self.job['metadata']['name']}-{index}", "--network-alias", self.dns_name(index),
            *container_flags(self.pod, self.container),
            *volume_flags(self.pod, self.container, self.config_maps, pod_dir),
            *env_flags,
            *(["--entrypoint", json.dumps(command)] if command else []),
            self.image, *self.container.get("args", []),
        )
        self.current[index] = name
        self.containers.append(name)

    def state(self, index: int) -> tuple[str, int]:
        out = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", self.current[index]).stdout
        status, code = out.split()
        return status, int(code)

    def action(self, exit_code: int) -> str:
        """The first podFailurePolicy rule that matches the exit code; Count when none does."""
        for rule in self.spec["podFailurePolicy"]["rules"]:
            codes = rule.get("onExitCodes")
            if codes and (exit_code in codes["values"]) == (codes["operator"] == "In"):
                return str(rule["action"])
        return "Count"

    def run(self, deadline_s: float, on_tick: Callable[[IndexedJobPlayer], None] | None = None) -> None:
        for index in range(self.count):
            self.start(index)
        deadline = time.monotonic() + deadline_s
        while len(self.done) < self.count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the Job did not finish in {deadline_s} s: {self.logs()}")
            if on_tick:
                on_tick(self)
            for index in range(self.count):
                if index in self.done:
                    continue
                status, code = self.state(index)
                if status != "exited":
                    continue
                if code == 0:
                    self.done.add(index)
                    continue
                action = self.action(code)
                self.exits.append(Exit(index, self.attempts[index], code, action, time.monotonic()))
                if action == "FailJob":
                    raise AssertionError(f"pod {index} exited {code}: the Job fails. {self.logs()}")
                if action == "Count":
                    self.failures[index] += 1
                    if self.failures[index] > self.spec["backoffLimitPerIndex"]:
                        raise AssertionError(f"index {index} is out of restarts: the Job fails. {self.logs()}")
                self.start(index)
            time.sleep(0.5)

    def stop(self, index: int) -> float:
        """What the kubelet does to an evicted pod: SIGTERM, SIGKILL after the grace period; returns seconds."""
        started = time.monotonic()
        podman("stop", "--time", str(self.pod["terminationGracePeriodSeconds"]), self.current[index], timeout=300)
        return time.monotonic() - started

    def kill(self, index: int) -> None:
        podman("kill", "--signal", str(int(signal.SIGKILL)), self.current[index])

    def logs(self) -> str:
        parts = []
        for name in self.containers:
            result = podman("logs", name, check=False)
            parts.append(f"--- {name}\n{(result.stdout + result.stderr)[-3000:]}")
        return "\n".join(parts)

    def remove(self) -> None:
        for name in self.containers:
            podman("rm", "--force", "--time", "0", name, check=False)
        shutil.rmtree(self.work_dir, ignore_errors=True)
