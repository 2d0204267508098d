"""`sidekey webhook` logs one JSON object per line, as the operator and the sidecar do."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sidekey.core import certificates, contract
from sidekey.localcluster.cluster import free_port


def test_the_webhook_logs_json_lines(tmp_path: Path) -> None:
    ca = certificates.make_ca("log-test-ca")
    pair = certificates.issue(ca, "sidekey-webhook", ip_addresses=["127.0.0.1"])
    (tmp_path / contract.TLS_CERT_KEY).write_bytes(pair.cert_pem)
    (tmp_path / contract.TLS_KEY_KEY).write_bytes(pair.key_pem)
    # an apiserver that is not there: the webhook still starts, and logs why it cannot read policies
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{free_port()}",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sidekey", "webhook", "--host", "127.0.0.1", "--port", str(free_port()),
         "--tls-dir", str(tmp_path), "--kubeconfig", str(kubeconfig)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(4)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, "the webhook logged nothing"
    records = [json.loads(line) for line in lines]  # a plain-text line fails here
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records), records
    assert any("listening" in r["message"] and r["logger"] == "sidekey.webhook" for r in records), records
    assert "not-a-real-token" not in out
