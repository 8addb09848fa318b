"""Client certificates on TLS listeners (SPEC §3 `server.listeners[].tls`, §5, §8; issue 5).

The PKI comes from pki.py (root -> intermediate -> client leaves, a revoked, an expired and a
foreign leaf, CRLs of both CAs). Clients: curl (`--cert/--key/--cacert`), httpx with a client
certificate, and the official `openai` SDK on such an httpx client.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import subprocess
import time

import httpx
import pytest
import yaml

import agw
from agw import API_VERSION, KEY
from pki import Pki, colon_upper

DEPLOYMENT = "gpt-4o"
CHAT = agw.chat_path(DEPLOYMENT)
BODY = agw.chat_body("Hello over mTLS.")


# --------------------------------------------------------------------------------------
# helpers


def tls_listener(pki: Pki, mode: str | None, bundle=None, crls=None) -> dict:
    tls = {"certificate": str(pki.server.chain), "private_key": str(pki.server.key)}
    if mode is not None:
        tls["client_certificates"] = {
            "mode": mode,
            "trust_bundle": str(bundle or pki.trust_bundle),
            "crls": [str(p) for p in (pki.crl_paths if crls is None else crls)],
        }
    return {"address": f"127.0.0.1:{agw.free_port()}", "tls": tls}


def mtls_clients(pki: Pki) -> list[dict]:
    return [
        agw.client("test-client"),  # the API key client
        agw.client("fp-client", keys=(),
                   certificates=[{"sha256": colon_upper(pki.leaf["fp-device"].fingerprint)}]),
        agw.client("subject-client", keys=(),
                   certificates=[{"subject": "CN=plant-7-edge,O=Contoso"}]),
        agw.client("late-client", keys=(),
                   certificates=[{"sha256": pki.leaf["late-device"].fingerprint}]),
    ]


def start(cluster, pki: Pki, mock, mode: str | None, server_extra: dict | None = None,
          **kw) -> agw.Gateway:
    cfg = agw.single(
        mock, deployment=DEPLOYMENT,
        clients=mtls_clients(pki),
        server={"listeners": [tls_listener(pki, mode, **kw)], **(server_extra or {})},
        health_checks={"interval_seconds": 3600},
    )
    return cluster.gateway(cfg)


def https(gw: agw.Gateway) -> str:
    return "https://" + gw.listeners[0]


def client_for(pki: Pki, cert: str | None, chain: bool = False, **kw) -> httpx.Client:
    """httpx trusting the server CA, presenting leaf `cert` (or none); with `chain`, the
    client sends its intermediate too.

    httpx 0.28 ignores `cert=` when `verify` is a path: the certificate goes into the
    SSLContext."""
    ctx = ssl.create_default_context(cafile=str(pki.server_ca.crt))
    if cert:
        c = pki.leaf[cert]
        ctx.load_cert_chain(str(c.chain if chain else c.crt), str(c.key))
    return agw.http_client(verify=ctx, **kw)


def curl(pki: Pki, gw: agw.Gateway, cert: str | None, *extra: str,
         headers: dict[str, str] | None = None) -> tuple[int, int, dict[str, str], str, str]:
    """POST the chat request with curl; returns (curl exit code, HTTP status (0: none),
    response headers, body, curl's stderr)."""
    argv = ["curl", "-sS", "--max-time", "20", "--cacert", str(pki.server_ca.crt),
            "-o", "-", "-D", "/dev/stderr", "-w", "\n%{http_code}",
            "-H", "content-type: application/json", "--data", json.dumps(BODY)]
    if cert:
        argv += ["--cert", str(pki.leaf[cert].crt), "--key", str(pki.leaf[cert].key)]
    for k, v in (headers or {}).items():
        argv += ["-H", f"{k}: {v}"]
    argv += [*extra, https(gw) + CHAT]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                       env=agw.clean_env())
    body, _, code = r.stdout.rpartition("\n")
    hdrs = {}
    for line in r.stderr.splitlines():
        k, sep, v = line.partition(":")
        if sep and not k.startswith("curl"):
            hdrs[k.strip().lower()] = v.strip()
    return r.returncode, int(code or 0), hdrs, body, r.stderr


def metric(gw: agw.Gateway, name: str, **labels) -> float | None:
    text = gw.admin.get("/metrics").text
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line[line.index("{"):line.index("}")]))
        if got == labels:
            return float(line.rsplit(" ", 1)[1])
    return None


def failures(gw: agw.Gateway, reason: str) -> float:
    return metric(gw, "aoai_gateway_tls_handshake_failures_total", reason=reason) or 0.0


def wait_failures(gw: agw.Gateway, reason: str, expected: float) -> None:
    agw.wait_until(lambda: failures(gw, reason) >= expected, 10,
                   f"tls_handshake_failures_total{{reason={reason}}} to reach {expected}")
    time.sleep(0.2)
    assert failures(gw, reason) == expected, f"{reason} counted more than once"


def not_after(crt) -> int:
    out = subprocess.run(["openssl", "x509", "-in", str(crt), "-noout", "-enddate"],
                         capture_output=True, text=True, check=True).stdout
    return int(ssl.cert_time_to_seconds(out.strip().split("=", 1)[1]))


def assert_refused(fn) -> Exception:
    """The call fails at the TLS layer: no HTTP response at all."""
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError,
                        ssl.SSLError)) as ei:
        fn()
    return ei.value


# --------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def backend(module_cluster):
    return module_cluster.mock("mtls-east")


@pytest.fixture(scope="module")
def required_gw(module_cluster, pki, backend):
    return start(module_cluster, pki, backend, "required")


@pytest.fixture(scope="module")
def optional_gw(module_cluster, pki, backend):
    return start(module_cluster, pki, backend, "optional")


# --------------------------------------------------------------------------------------
# good certificates


def test_fingerprint_mapped_certificate_with_curl(required_gw, pki, backend):
    before = len(backend.data_requests())
    rc, status, hdrs, body, err = curl(pki, required_gw, "fp-device")
    assert rc == 0 and status == 200, (rc, status, body, err)
    assert json.loads(body)["choices"][0]["message"]["content"] == "Hello from mtls-east."
    reqs = backend.data_requests()
    assert len(reqs) == before + 1
    assert reqs[-1]["path"] == f"/openai/deployments/{DEPLOYMENT}/chat/completions"
    line = required_gw.audit_for(hdrs.get("x-request-id"))
    assert line["client"] == "fp-client", line
    assert line["auth"] == "certificate", line
    assert line["status"] == 200
    assert line["key_id"] is None


def test_subject_mapped_certificate_with_openai_sdk(required_gw, pki, backend):
    import openai

    def drop_api_key(request: httpx.Request):
        # The SDK insists on a credential; this client has only its certificate.
        request.headers.pop("api-key", None)

    http = client_for(pki, "plant-7-edge", event_hooks={"request": [drop_api_key]})
    sdk = openai.AzureOpenAI(azure_endpoint=https(required_gw), api_key="unused",
                             api_version=API_VERSION, max_retries=0, http_client=http)
    before = len(backend.data_requests())
    raw = sdk.chat.completions.with_raw_response.create(
        model=DEPLOYMENT, messages=BODY["messages"])
    resp = raw.parse()
    assert resp.choices[0].message.content == "Hello from mtls-east."
    assert len(backend.data_requests()) == before + 1
    up = backend.data_requests()[-1]
    assert "api-key" not in up["headers"], up
    assert up["headers"].get("authorization") == f"Bearer {agw.MI_TOKEN}", up
    line = required_gw.audit_for(raw.headers.get("x-request-id"))
    assert line["client"] == "subject-client", line
    assert line["auth"] == "certificate", line
    http.close()


def test_h2_alpn_and_tls12_minimum(required_gw, pki):
    def curl_healthz(*flags: str, write_out: str) -> subprocess.CompletedProcess:
        leaf = pki.leaf["fp-device"]
        return subprocess.run(
            ["curl", "-sS", *flags, "-o", "/dev/null", "-w", write_out,
             "--cacert", str(pki.server_ca.crt), "--cert", str(leaf.crt), "--key", str(leaf.key),
             https(required_gw) + "/healthz"],
            capture_output=True, text=True, env=agw.clean_env())

    out = curl_healthz("--http2", write_out="%{http_version}")
    assert out.stdout == "2", (out.stdout, out.stderr)
    out = curl_healthz("--http1.1", write_out="%{http_version}")
    assert out.stdout == "1.1", (out.stdout, out.stderr)
    old = curl_healthz("--tlsv1.0", "--tls-max", "1.1", "--ciphers", "DEFAULT@SECLEVEL=0",
                       write_out="%{http_code}")
    assert old.returncode != 0 and old.stdout == "000", (old.stdout, old.stderr)


def test_chat_over_http2_is_served_and_attributed(required_gw, pki, backend):
    """HTTP/2 clients go through Pingora's session rather than the HTTP/1 codec: the same
    answer, attribution, headers and errors."""
    before = len(backend.data_requests())
    rc, status, hdrs, body, err = curl(pki, required_gw, "fp-device", "--http2")
    assert rc == 0 and status == 200, (rc, status, body, err)
    assert "HTTP/2 200" in err, err
    assert json.loads(body)["choices"][0]["message"]["content"] == "Hello from mtls-east."
    assert int(hdrs["content-length"]) == len(body.encode())
    reqs = backend.data_requests()
    assert len(reqs) == before + 1
    line = required_gw.audit_for(hdrs.get("x-request-id"))
    assert (line["client"], line["auth"], line["status"]) == ("fp-client", "certificate", 200)
    assert line["prompt_tokens"] is not None and line["usage_source"] == "response", line

    rc, status, hdrs, body, err = curl(pki, required_gw, "unmapped", "--http2")
    assert rc == 0 and status == 403 and "HTTP/2 403" in err, (rc, status, body, err)
    assert hdrs.get("x-request-id"), hdrs
    assert json.loads(body)["error"]["code"] == "Forbidden", body
    assert len(backend.data_requests()) == before + 1


def test_expiry_gauge_on_admin_metrics(required_gw, pki):
    with client_for(pki, "fp-device") as h:
        assert h.post(https(required_gw) + CHAT, json=BODY).status_code == 200
    fp = pki.leaf["fp-device"].fingerprint
    v = metric(required_gw, "aoai_gateway_client_certificate_expiry_timestamp_seconds",
               client="fp-client", fingerprint=fp)
    assert v == not_after(pki.leaf["fp-device"].crt), v
    with client_for(pki, "unmapped") as h:
        h.post(https(required_gw) + CHAT, json=BODY)
    fp = pki.leaf["unmapped"].fingerprint
    v = metric(required_gw, "aoai_gateway_client_certificate_expiry_timestamp_seconds",
               client="unmapped", fingerprint=fp)
    assert v == not_after(pki.leaf["unmapped"].crt), v


def test_unmapped_certificate_is_forbidden(required_gw, pki, backend):
    before = len(backend.data_requests())
    with client_for(pki, "unmapped") as h:
        r = h.post(https(required_gw) + CHAT, json=BODY)
    agw.assert_error(r, 403, "Forbidden")
    assert len(backend.data_requests()) == before
    line = required_gw.audit_for(r.headers.get("x-request-id"))
    assert line["client"] == "anonymous", line
    assert line["auth"] == "certificate", line
    assert line["status"] == 403


def test_client_sends_intermediate_to_root_only_bundle(module_cluster, pki, backend):
    gw = start(module_cluster, pki, backend, "required", bundle=pki.root_only_bundle)
    with client_for(pki, "fp-device", chain=True) as h:
        r = h.post(https(gw) + CHAT, json=BODY)
        assert r.status_code == 200, r.text
    assert gw.audit_for(r.headers.get("x-request-id"))["client"] == "fp-client"
    # without the intermediate the leaf does not chain to the root alone
    with client_for(pki, "fp-device") as h:
        assert_refused(lambda: h.post(https(gw) + CHAT, json=BODY))
    wait_failures(gw, "unknown_ca", 1)


# --------------------------------------------------------------------------------------
# refused at the handshake


@pytest.mark.parametrize("leaf,reason", [
    ("revoked", "revoked"),
    ("expired", "expired"),
    ("foreign", "unknown_ca"),
])
def test_bad_certificate_refused_with_curl(required_gw, pki, backend, leaf, reason):
    before_reqs = len(backend.data_requests())
    before = failures(required_gw, reason)
    rc, status, _, body, err = curl(pki, required_gw, leaf, headers={"api-key": KEY})
    assert rc != 0 and status == 0, f"curl got an HTTP answer: {status} {body} {err}"
    wait_failures(required_gw, reason, before + 1)
    assert len(backend.data_requests()) == before_reqs
    c = pki.leaf[leaf]
    log = required_gw.proc.stderr()
    assert any(reason in l and c.fingerprint in l and c.subject in l
               for l in log.splitlines()), f"no refusal log line for {leaf}:\n{log[-3000:]}"


@pytest.mark.parametrize("leaf,reason", [
    ("revoked", "revoked"),
    ("expired", "expired"),
    ("foreign", "unknown_ca"),
])
def test_bad_certificate_refused_with_openai_sdk(required_gw, pki, backend, leaf, reason):
    import openai

    before_reqs = len(backend.data_requests())
    before = failures(required_gw, reason)
    sdk = openai.AzureOpenAI(azure_endpoint=https(required_gw), api_key=KEY,
                             api_version=API_VERSION, max_retries=0,
                             http_client=client_for(pki, leaf))
    with pytest.raises(openai.APIConnectionError):
        sdk.chat.completions.create(model=DEPLOYMENT, messages=BODY["messages"])
    wait_failures(required_gw, reason, before + 1)
    assert len(backend.data_requests()) == before_reqs


def test_missing_certificate_refused_in_required_mode(required_gw, pki, backend):
    before_reqs = len(backend.data_requests())
    before = failures(required_gw, "no_certificate")
    # even with a valid API key
    rc, status, _, body, err = curl(pki, required_gw, None, headers={"api-key": KEY})
    assert rc != 0 and status == 0, f"curl got an HTTP answer: {status} {body} {err}"
    wait_failures(required_gw, "no_certificate", before + 1)
    with client_for(pki, None) as h:
        assert_refused(lambda: h.post(https(required_gw) + CHAT, json=BODY,
                                      headers={"api-key": KEY}))
    wait_failures(required_gw, "no_certificate", before + 2)
    assert len(backend.data_requests()) == before_reqs
    assert "presented no certificate" in required_gw.proc.stderr()


# --------------------------------------------------------------------------------------
# optional mode


def test_optional_without_certificate_api_key_works(optional_gw, pki, backend):
    before = len(backend.data_requests())
    with client_for(pki, None) as h:
        r = h.post(https(optional_gw) + CHAT, json=BODY, headers={"api-key": KEY})
        assert r.status_code == 200, r.text
        line = optional_gw.audit_for(r.headers.get("x-request-id"))
        assert (line["client"], line["auth"]) == ("test-client", "api_key"), line
        r = h.post(https(optional_gw) + CHAT, json=BODY)
        agw.assert_error(r, 401, "MissingCredential")
    assert len(backend.data_requests()) == before + 1
    assert failures(optional_gw, "no_certificate") == 0


def test_optional_with_good_certificate(optional_gw, pki, backend):
    rc, status, hdrs, body, err = curl(pki, optional_gw, "plant-7-edge")
    assert rc == 0 and status == 200, (rc, status, body, err)
    line = optional_gw.audit_for(hdrs.get("x-request-id"))
    assert (line["client"], line["auth"]) == ("subject-client", "certificate"), line


@pytest.mark.parametrize("leaf,reason", [("revoked", "revoked"), ("foreign", "unknown_ca"),
                                         ("expired", "expired")])
def test_optional_bad_certificate_still_refused(optional_gw, pki, backend, leaf, reason):
    before_reqs = len(backend.data_requests())
    before = failures(optional_gw, reason)
    with client_for(pki, leaf) as h:
        assert_refused(lambda: h.post(https(optional_gw) + CHAT, json=BODY,
                                      headers={"api-key": KEY}))
    wait_failures(optional_gw, reason, before + 1)
    assert len(backend.data_requests()) == before_reqs


# --------------------------------------------------------------------------------------
# CRL and trust bundle updates: SIGHUP re-reads them, no connection dropped


def reload(gw: agw.Gateway) -> None:
    n = metric(gw, "aoai_gateway_config_reloads_total", result="success") or 0
    gw.process.send_signal(signal.SIGHUP)
    agw.wait_until(
        lambda: (metric(gw, "aoai_gateway_config_reloads_total", result="success") or 0) > n,
        10, "the configuration reload")


def test_crl_update_takes_effect_on_sighup_without_dropping_connections(cluster, tmp_path):
    pki = Pki(tmp_path / "pki")
    m = cluster.mock("crl-east")
    gw = start(cluster, pki, m, "required")

    kept = client_for(pki, "late-device")  # its connection stays open across the reload
    r = kept.post(https(gw) + CHAT, json=BODY)
    assert r.status_code == 200, r.text
    assert gw.audit_for(r.headers["x-request-id"])["client"] == "late-client"

    pki.revoke("late-device")  # rewrites the intermediate's CRL file in place
    # Not yet: the CRL is re-read on reload, not by watching the file.
    with client_for(pki, "late-device") as h:
        assert h.post(https(gw) + CHAT, json=BODY).status_code == 200

    reload(gw)
    before_reqs = len(m.data_requests())
    with client_for(pki, "late-device") as h:
        assert_refused(lambda: h.post(https(gw) + CHAT, json=BODY))
    rc, status, _, _, err = curl(pki, gw, "late-device")
    assert rc != 0 and status == 0, err
    wait_failures(gw, "revoked", 2)
    assert len(m.data_requests()) == before_reqs
    assert "re-read trust bundle" in gw.proc.stderr()

    # the connection made before the reload was not dropped (a new one would be refused)
    r = kept.post(https(gw) + CHAT, json=BODY)
    assert r.status_code == 200, r.text
    # what cuts off that open connection: unlisting the certificate in the same kind of reload
    cfg = yaml.safe_load(gw.config_path.read_text())
    for c in cfg["clients"]:
        if c["id"] == "late-client":
            c["certificates"] = []
            c["api_keys"] = [{"sha256": agw.OTHER_KEY_SHA256}]
    gw.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    reload(gw)
    agw.assert_error(kept.post(https(gw) + CHAT, json=BODY), 403, "Forbidden")
    kept.close()
    # other certificates are unaffected
    with client_for(pki, "fp-device") as h:
        assert h.post(https(gw) + CHAT, json=BODY).status_code == 200


def test_trust_bundle_update_takes_effect_on_sighup(cluster, tmp_path):
    pki = Pki(tmp_path / "pki")
    m = cluster.mock("bundle-east")
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(pki.trust_bundle.read_text())
    gw = start(cluster, pki, m, "required", bundle=bundle,
               crls=pki.crl_paths + [pki.other_root.crl])
    with client_for(pki, "foreign") as h:
        assert_refused(lambda: h.post(https(gw) + CHAT, json=BODY))
    wait_failures(gw, "unknown_ca", 1)

    bundle.write_text(pki.trust_bundle.read_text() + pki.other_root.crt.read_text())
    reload(gw)
    with client_for(pki, "foreign") as h:
        r = h.post(https(gw) + CHAT, json=BODY)
    # verified now; it maps to no client
    agw.assert_error(r, 403, "Forbidden")
    assert failures(gw, "unknown_ca") == 1

    # a broken CRL file on reload: the previous trust material stays in force
    pki.intermediate.crl.write_text("not a CRL\n")
    reload(gw)
    with client_for(pki, "revoked") as h:
        assert_refused(lambda: h.post(https(gw) + CHAT, json=BODY))
    with client_for(pki, "fp-device") as h:
        assert h.post(https(gw) + CHAT, json=BODY).status_code == 200
    assert "stay in force" in gw.proc.stderr()


def test_mode_follows_reload(cluster, tmp_path):
    pki = Pki(tmp_path / "pki")
    m = cluster.mock("mode-east")
    gw = start(cluster, pki, m, "optional")
    with client_for(pki, None) as h:
        assert h.post(https(gw) + CHAT, json=BODY, headers={"api-key": KEY}).status_code == 200
    cfg = yaml.safe_load(gw.config_path.read_text())
    cfg["server"]["listeners"][0]["tls"]["client_certificates"]["mode"] = "required"
    gw.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    reload(gw)
    with client_for(pki, None) as h:
        assert_refused(lambda: h.post(https(gw) + CHAT, json=BODY, headers={"api-key": KEY}))
    wait_failures(gw, "no_certificate", 1)
    with client_for(pki, "fp-device") as h:
        assert h.post(https(gw) + CHAT, json=BODY).status_code == 200


def upgrade(cluster, gw: agw.Gateway) -> agw.Proc:
    """The graceful upgrade: `aoai-gateway run -c FILE --upgrade`, then SIGQUIT to the old
    process, which hands over its listening sockets and drains. Returns the new process."""
    ident = cluster.identity_mock()
    env = agw.clean_env({"IDENTITY_ENDPOINT": f"{ident.url}/msi/token",
                         "IDENTITY_HEADER": agw.MI_HEADER_SECRET})
    new = agw.Proc("gateway-upgraded", [str(agw.GATEWAY_BIN), "run", "-c", str(gw.config_path),
                                        "--upgrade"], cluster.workdir, env)
    cluster.procs.append(new)
    agw.wait_until(lambda: "Bootstrap starting" in new.stderr(), 30,
                   "the --upgrade instance to start")
    time.sleep(0.5)
    gw.process.send_signal(signal.SIGQUIT)
    gw.process.wait(timeout=60)
    # the old instance is meant to exit: stop the harness from reporting it
    cluster.gateways.remove(gw)
    gw.close()
    assert new.alive(), new.tail()
    return new


def test_crl_update_takes_effect_on_graceful_upgrade(cluster, tmp_path):
    pki = Pki(tmp_path / "pki")
    m = cluster.mock("upgrade-east")
    gw = start(cluster, pki, m, "required")
    with client_for(pki, "late-device") as h:
        assert h.post(https(gw) + CHAT, json=BODY).status_code == 200

    pki.revoke("late-device")
    new = upgrade(cluster, gw)
    admin = agw.http_client(base_url=gw.admin_url)
    agw.wait_until(lambda: admin.get("/healthz").status_code in (200, 503), 30,
                   "the upgraded instance's admin listener")

    before_reqs = len(m.data_requests())
    with client_for(pki, "late-device") as h:
        assert_refused(lambda: h.post(https(gw) + CHAT, json=BODY))
    assert len(m.data_requests()) == before_reqs
    assert "refused at the TLS handshake: revoked" in new.stderr()
    assert 'aoai_gateway_tls_handshake_failures_total{reason="revoked"} 1' in \
        admin.get("/metrics").text
    with client_for(pki, "fp-device") as h:
        r = h.post(https(gw) + CHAT, json=BODY)
        assert r.status_code == 200, r.text
    line = gw.audit_for(r.headers["x-request-id"])
    assert (line["client"], line["auth"]) == ("fp-client", "certificate"), line
    admin.close()


@pytest.mark.parametrize("pacing", ["per_pass", "none"])
def test_handshakes_are_counted_and_abandoned_ones_are_not_errors(module_cluster, pki, backend,
                                                                  pacing):
    """SPEC §8: handshakes by result, those under way, and a client that gives up in the middle
    of one is `downstream_errors_total{kind="handshake"}`, logged below warn — with the
    handshakes paced (`server.tls_handshake_pacing`, the default) and without."""
    gw = start(module_cluster, pki, backend, None,
               server_extra={"tls_handshake_pacing": pacing})
    host, port = gw.listeners[0].rsplit(":", 1)

    def counts() -> tuple[float, float, float]:
        return (metric(gw, "aoai_gateway_downstream_handshakes_total", result="success") or 0,
                metric(gw, "aoai_gateway_downstream_handshakes_total", result="failure") or 0,
                metric(gw, "aoai_gateway_downstream_errors_total", kind="handshake") or 0)

    # The harness's readiness probe (a connect and close) is counted asynchronously: the
    # baseline is taken once the counts have settled.
    ok0, failed0, abandoned0 = counts()
    for _ in range(20):
        time.sleep(0.3)
        if counts() == (ok0, failed0, abandoned0):
            break
        ok0, failed0, abandoned0 = counts()
    # Connected and closed at once; half a ClientHello, then closed.
    for partial in [b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]:
        for _ in range(3):
            with socket.create_connection((host, int(port))) as s:
                if partial:
                    s.sendall(partial)
    # Three complete handshakes (no certificate: optional mode).
    ctx = ssl.create_default_context(cafile=str(pki.server_ca.crt))
    for _ in range(3):
        with ctx.wrap_socket(socket.create_connection((host, int(port))),
                             server_hostname="localhost"):
            pass
    deadline = time.monotonic() + 5
    while counts()[1] < failed0 + 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    ok, failed, abandoned = counts()
    assert (ok - ok0, failed - failed0, abandoned - abandoned0) == (3, 6, 6)
    text = gw.admin.get("/metrics").text
    assert "\naoai_gateway_downstream_handshakes_in_progress 0\n" in text, text
    noisy = [l for l in gw.proc.stderr().splitlines()
             if ("ERROR" in l or "WARN" in l) and "andshake" in l]
    assert noisy == [], noisy


def test_h2_client_gone_mid_stream_is_normal_traffic(required_gw, pki, backend):
    """An HTTP/2 client that goes away in the middle of a stream (as h2load does at the end of
    a run) is normal traffic (SPEC §8): audited as 499, counted as `client_closed`, and nothing
    logged at WARN or ERROR — Pingora used to log the broken response twice at ERROR and try
    a 500 on the dead stream."""
    backend.faults(chunk_delay_ms=400)
    try:
        log_before = len(required_gw.proc.stderr())
        closed = metric(required_gw, "aoai_gateway_downstream_errors_total",
                        kind="client_closed") or 0.0
        leaf = pki.leaf["fp-device"]
        r = subprocess.run(
            ["curl", "-sS", "--http2", "--max-time", "1", "--cacert", str(pki.server_ca.crt),
             "--cert", str(leaf.crt), "--key", str(leaf.key), "-o", "/dev/null",
             "-D", "/dev/stderr", "-H", "content-type: application/json",
             "--data", json.dumps(dict(BODY, stream=True)), https(required_gw) + CHAT],
            capture_output=True, text=True, timeout=30, env=agw.clean_env())
        assert r.returncode == 28, (r.returncode, r.stderr)   # curl gave up mid-stream
        assert "HTTP/2 200" in r.stderr, r.stderr
        rid = re.search(r"(?im)^x-request-id:\s*(\S+)", r.stderr).group(1)
        line = required_gw.audit_for(rid)
        assert (line["status"], line["error_code"]) == (499, "ClientClosedRequest"), line
        assert metric(required_gw, "aoai_gateway_downstream_errors_total",
                      kind="client_closed") == closed + 1
        new_log = required_gw.proc.stderr()[log_before:]
        assert not re.search(r"\b(WARN|ERROR)\b", new_log), new_log
    finally:
        backend.faults(chunk_delay_ms=0)
