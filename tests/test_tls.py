"""OTLP over TLS with a client certificate (mutual TLS) and an auth header
read from a file, against a real gRPC receiver with certificates this test
makes with openssl; the secret never reaches the log."""
from __future__ import annotations

import subprocess

import grpc
import pytest
from conftest import needs_root
from otlp_data import points, read_jsonl

pytestmark = needs_root
TOKEN = "Bearer s3cr3t-token-do-not-log"


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=otelbpf test CA",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.pem", cwd=d)
    (d / "token").write_text(TOKEN + "\n")
    return d


@pytest.fixture
def tls_receiver(pki):
    from otlp_receiver import GrpcReceiver
    creds = grpc.ssl_server_credentials([((pki / "server.key").read_bytes(), (pki / "server.pem").read_bytes())],
                                        root_certificates=(pki / "ca.pem").read_bytes(), require_client_auth=True)
    r = GrpcReceiver(credentials=creds)
    yield r
    r.stop()


def test_mutual_tls_and_header_from_file(agent_factory, tls_receiver, pki):
    agent = agent_factory({"interval": "1s", "exporters": {"otlp": {
        "endpoint": tls_receiver.endpoint, "certificate": str(pki / "ca.pem"),
        "client_certificate": str(pki / "client.pem"), "client_key": str(pki / "client.key"),
        "headers": {"authorization": f"file:{pki / 'token'}"}}},
        "probes": {"syscall_latency": {}}}, args=("--duration", "3"))
    assert agent.wait(timeout=60) == 0, agent.stderr()
    assert tls_receiver.rx.metrics, agent.stderr()
    assert all(h.get("authorization") == TOKEN for h in tls_receiver.rx.headers)
    assert "s3cr3t" not in agent.stderr() + agent.stdout()


def test_without_the_client_certificate_nothing_is_delivered_and_failures_count(agent_factory, tls_receiver, pki,
                                                                                 tmp_path):
    jsonl = tmp_path / "t.jsonl"
    agent = agent_factory({"interval": "1s", "exporters": {
        "otlp": {"endpoint": tls_receiver.endpoint, "certificate": str(pki / "ca.pem"), "timeout": "1s"},
        "file": {"path": str(jsonl)}}, "probes": {"syscall_latency": {}}}, args=("--duration", "3"))
    assert agent.wait(timeout=60) == 0, agent.stderr()
    assert not tls_receiver.rx.metrics
    failed = [dp.as_int for _m, dp, _a in points(read_jsonl(jsonl), "otelbpf.dropped",
                                                 otelbpf__probe="exporter.otlp", reason="export_failed")]
    assert failed and max(failed) >= 1
