"""Pods of this node, from the Kubernetes API: pod UID -> name, namespace,
workload. A LIST, then a WATCH from its resourceVersion, on a thread; a lost
connection keeps the cache and retries with backoff. Only this node's pods
(fieldSelector spec.nodeName), so the cache stays small.

Configured in-cluster from the service account (KUBERNETES_SERVICE_HOST,
/var/run/secrets/kubernetes.io/serviceaccount), or with `kubernetes.api`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import ssl
import threading
import urllib.parse
import urllib.request
from typing import Optional

log = logging.getLogger("otelbpf.kubernetes")
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_RS_HASH = re.compile(r"^(.*)-[a-z0-9]{5,10}$")
BACKOFF_MAX_S = 60.0


def pod_attributes(pod: dict) -> dict:
    """Semantic-convention attributes of a pod object."""
    meta = pod.get("metadata", {})
    attrs = {"k8s.pod.name": meta.get("name"), "k8s.namespace.name": meta.get("namespace"),
             "k8s.pod.uid": meta.get("uid")}
    node = pod.get("spec", {}).get("nodeName")
    if node:
        attrs["k8s.node.name"] = node
    for owner in meta.get("ownerReferences", []) or []:
        kind, name = owner.get("kind"), owner.get("name", "")
        if kind == "ReplicaSet":
            m = _RS_HASH.match(name)  # deployment-name-<pod-template-hash>
            attrs["k8s.replicaset.name"] = name
            if m:
                attrs["k8s.deployment.name"] = m.group(1)
        elif kind in ("DaemonSet", "StatefulSet", "Job", "CronJob"):
            attrs[f"k8s.{kind.lower()}.name"] = name
    workload = (attrs.get("k8s.deployment.name") or attrs.get("k8s.daemonset.name")
                or attrs.get("k8s.statefulset.name") or attrs.get("k8s.job.name"))
    attrs["service.name"] = workload or attrs["k8s.pod.name"]  # as Beyla derives it
    return {k: v for k, v in attrs.items() if v}


class PodCache:
    def __init__(self, api: str, node: str, token: Optional[str] = None, ca_file: Optional[str] = None,
                 max_pods: int = 4096):
        self.api = api.rstrip("/")
        self.node = node
        self.token = token
        self.ctx = ssl.create_default_context(cafile=ca_file) if api.startswith("https") else None
        self._pods: dict = {}
        self._max = max_pods
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.synced = threading.Event()
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="k8s-pods", daemon=True)

    @classmethod
    def in_cluster(cls, node: str) -> Optional["PodCache"]:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not os.path.exists(f"{SA_DIR}/token"):
            return None
        with open(f"{SA_DIR}/token") as f:
            token = f.read().strip()
        return cls(f"https://{host}:{port or 443}", node, token=token, ca_file=f"{SA_DIR}/ca.crt")

    def start(self) -> "PodCache":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def get(self, uid: str) -> Optional[dict]:
        with self._lock:
            return self._pods.get(uid)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pods)

    # ------------------------------------------------------------- API
    def _open(self, params: dict, timeout: float):
        q = urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={self.node}", **params})
        req = urllib.request.Request(f"{self.api}/api/v1/pods?{q}")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        return urllib.request.urlopen(req, timeout=timeout, context=self.ctx)

    def _put(self, pod: dict) -> None:
        uid = pod.get("metadata", {}).get("uid")
        if not uid:
            return
        with self._lock:
            self._pods[uid] = pod_attributes(pod)
            while len(self._pods) > self._max:
                self._pods.pop(next(iter(self._pods)))

    def _delete(self, pod: dict) -> None:
        with self._lock:
            self._pods.pop(pod.get("metadata", {}).get("uid"), None)

    def _list(self) -> str:
        with self._open({}, timeout=30) as r:
            body = json.load(r)
        with self._lock:
            self._pods.clear()
        for pod in body.get("items", []):
            self._put(pod)
        self.synced.set()
        return body.get("metadata", {}).get("resourceVersion", "")

    def _watch(self, version: str) -> None:
        with self._open({"watch": "1", "resourceVersion": version, "allowWatchBookmarks": "true"},
                        timeout=330) as r:
            for line in r:
                if self._stop.is_set():
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object", {})
                if kind in ("ADDED", "MODIFIED"):
                    self._put(obj)
                elif kind == "DELETED":
                    self._delete(obj)
                elif kind == "ERROR":  # e.g. 410 Gone: the version is too old, LIST again
                    return

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                version = self._list()
                backoff = 1.0
                self._watch(version)
            except Exception as e:  # API down, timeout, bad JSON: keep the cache, retry
                self.errors += 1
                log.warning("kubernetes API %s: %s; keeping %d cached pods, retrying in %.0fs",
                            self.api, str(e).splitlines()[0] if str(e) else type(e).__name__, len(self), backoff)
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
