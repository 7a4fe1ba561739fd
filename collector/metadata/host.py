"""Resource attributes of this host (OpenTelemetry semantic conventions)."""
from __future__ import annotations

import platform
import socket

from opentelemetry.sdk.resources import Resource

from .. import __version__

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm32", "ppc64le": "ppc64", "s390x": "s390x"}


def _read(path: str):
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _os_description():
    rel = _read("/etc/os-release") or ""
    for line in rel.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"') + f" (Linux {platform.release()})"
    return f"Linux {platform.release()}"


def host_resource(extra: dict) -> Resource:
    """Detected host attributes, overridden by OTEL_RESOURCE_ATTRIBUTES /
    OTEL_SERVICE_NAME (Resource.create reads them), then by the config's
    `resource:` map."""
    detected = {
        "service.name": "otelbpf",
        "service.version": __version__,
        "host.name": socket.gethostname(),
        "host.arch": _ARCH.get(platform.machine(), platform.machine()),
        "os.type": "linux",
        "os.description": _os_description(),
        "telemetry.sdk.name": "opentelemetry",
        "telemetry.distro.name": "otelbpf",
    }
    host_id = _read("/etc/machine-id")
    if host_id:
        detected["host.id"] = host_id
    env_and_defaults = Resource(detected).merge(Resource.create({}))
    # Resource.create adds service.name=unknown_service when none is set; ours wins
    # unless the environment named one.
    attrs = dict(env_and_defaults.attributes)
    if attrs.get("service.name", "").startswith("unknown_service"):
        attrs["service.name"] = "otelbpf"
    attrs.update(extra)
    return Resource(attrs)
