"""Pod attribution against a fake Kubernetes API server speaking the real
list/watch JSON (no cluster exists here): list, watch events, a lost API
that keeps the cache, and a real process in a pod-like cgroup."""
from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from conftest import needs_root

from collector.metadata.enrich import ProcessEnricher
from collector.metadata.kubernetes import PodCache, pod_attributes
from collector.records import Counter, Instrument

NODE = "node-a"
U1 = "11111111-2222-3333-4444-555555555555"
U2 = "66666666-7777-8888-9999-aaaaaaaaaaaa"


def pod(uid, name, ns, owner_kind, owner_name, node=NODE):
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"uid": uid, "name": name, "namespace": ns, "resourceVersion": "1",
                         "ownerReferences": [{"kind": owner_kind, "name": owner_name, "controller": True}]},
            "spec": {"nodeName": node}}


WEB = pod(U1, "web-7d9f8b6c5d-x2k4q", "shop", "ReplicaSet", "web-7d9f8b6c5d")
AGENT = pod(U2, "fluent-bit-9zq8w", "logging", "DaemonSet", "fluent-bit")


class FakeApi:
    def __init__(self):
        self.requests = []
        self.watch_events = []
        self.pods = [WEB]
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                url = urlparse(self.path)
                q = parse_qs(url.query)
                api.requests.append((url.path, q))
                if url.path != "/api/v1/pods" or q.get("fieldSelector") != [f"spec.nodeName={NODE}"]:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                if q.get("watch") == ["1"]:
                    for ev in api.watch_events:
                        self.wfile.write((json.dumps(ev) + "\n").encode())
                        self.wfile.flush()
                    time.sleep(0.5)  # then the server ends the watch, as real ones do
                    return
                body = {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "100"},
                        "items": api.pods}
                self.wfile.write(json.dumps(body).encode())

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def wait_for(cond, timeout=10):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_pod_attributes_and_workload_names():
    a = pod_attributes(WEB)
    assert a == {"k8s.pod.name": "web-7d9f8b6c5d-x2k4q", "k8s.namespace.name": "shop", "k8s.pod.uid": U1,
                 "k8s.node.name": NODE, "k8s.replicaset.name": "web-7d9f8b6c5d", "k8s.deployment.name": "web",
                 "service.name": "web"}
    assert pod_attributes(AGENT)["k8s.daemonset.name"] == "fluent-bit"
    assert pod_attributes(AGENT)["service.name"] == "fluent-bit"


def test_list_then_watch_then_outage_keeps_cache():
    api = FakeApi()
    api.watch_events = [{"type": "ADDED", "object": AGENT}, {"type": "DELETED", "object": WEB}]
    cache = PodCache(api.url, NODE).start()
    try:
        wait_for(lambda: cache.get(U2) is not None and cache.get(U1) is None)
        watch = [q for p, q in api.requests if q.get("watch") == ["1"]]
        assert watch and watch[0]["resourceVersion"] == ["100"]  # the watch resumes from the list
        api.stop()  # the API goes away: the cache stays, errors are counted and retried
        wait_for(lambda: cache.errors >= 1)
        assert cache.get(U2)["k8s.daemonset.name"] == "fluent-bit"
    finally:
        cache.stop()


@needs_root
def test_a_process_in_a_pod_cgroup_gets_its_pod_names():
    from collector.metadata.cgroup import cgroup2_root
    api = FakeApi()
    cache = PodCache(api.url, NODE).start()
    cg = f"{cgroup2_root()}/otelbpf-test-pod{U1.replace('-', '_')}.slice"
    os.mkdir(cg)
    p = subprocess.Popen(["sleep", "30"])
    try:
        wait_for(cache.synced.is_set)
        with open(f"{cg}/cgroup.procs", "w") as f:
            f.write(str(p.pid))
        rec = Counter(Instrument("t", "1", ""), {"process.pid": p.pid}, 1, 0)
        ProcessEnricher(pods=cache).enrich([rec])
        a = rec.attributes
        assert (a["k8s.pod.uid"], a["k8s.pod.name"], a["k8s.namespace.name"]) == (U1, "web-7d9f8b6c5d-x2k4q", "shop")
        assert a["k8s.deployment.name"] == "web" and a["service.name"] == "web"
    finally:
        p.kill()
        p.wait()
        os.rmdir(cg)
        cache.stop()
        api.stop()
