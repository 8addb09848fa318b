"""The command line (SPEC §2, §3): `check`, `keys new`, `keys hash`."""

from __future__ import annotations

import re
import subprocess

import yaml

import agw


def run(*args: str, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    agw.require_binary(agw.GATEWAY_BIN)
    return subprocess.run(
        [str(agw.GATEWAY_BIN), *args], input=input, capture_output=True, text=True,
        timeout=60, env=agw.clean_env(env),
    )


def valid_config(tmp_path) -> dict:
    cfg = agw.make_config(
        deployments={"gpt-4o": [agw.member("east"), agw.member("sweden", priority=2)]},
        backends=[
            agw.backend("east", "http://127.0.0.1:9", region="eastus"),
            agw.backend("sweden", "http://127.0.0.1:9", region="swedencentral",
                        credential="api_key", api_key="${AGW_TEST_SWEDEN_KEY}"),
        ],
        audit_log={"path": str(tmp_path / "audit.log")},
    )
    cfg["server"]["listeners"] = [{"address": "127.0.0.1:18080"}]
    cfg["server"]["admin_address"] = "127.0.0.1:19464"
    return cfg


def test_check_accepts_a_valid_file(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(valid_config(tmp_path), sort_keys=False))
    p = run("check", "-c", str(path), env={"AGW_TEST_SWEDEN_KEY": "k"})
    assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}"


INVALID = f"""\
server:
  listeners:
    - address: 127.0.0.1:18080
  admin_address: 127.0.0.1:19464
  request_timeout_seconds: 30
clients:
  - id: test-client
    api_keys:
      - sha256: {agw.KEY_SHA256}
    allow:
      deployments: ["*"]
      operations: ["*"]
deployments:
  gpt-4o:
    - backend: east
    - backend: sweden
      priority: 2
backends:
  - name: east
    url: http://127.0.0.1:9
    region: eastus
    credential: managed_identity
    colour: blue
  - name: sweden
    url: http://127.0.0.1:9
    region: swedencentral
    credential: api_key
    api_key: ${{AGW_TEST_SURELY_MISSING_VAR}}
retries:
  max_attempts: lots
"""


def _line_of(text: str, needle: str) -> int:
    for i, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            return i
    raise AssertionError(needle)


def test_check_reports_every_error_with_path_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(INVALID)
    p = run("check", "-c", str(path))
    out = p.stdout + "\n" + p.stderr
    assert p.returncode == 1, f"exit {p.returncode}; output:\n{out}"

    expected = [
        ("unknown key", r"backends\W{0,2}0\W{0,2}colour", _line_of(INVALID, "colour: blue")),
        ("missing ${VAR}", r"backends\W{0,2}1\W{0,2}api_key",
         _line_of(INVALID, "AGW_TEST_SURELY_MISSING_VAR")),
        ("bad value", r"retries\W{1,2}max_attempts", _line_of(INVALID, "max_attempts: lots")),
    ]
    lines = out.splitlines()
    for what, path_re, lineno in expected:
        hits = [l for l in lines if re.search(path_re, l) and re.search(rf"(?<!\d){lineno}(?!\d)", l)]
        assert hits, f"{what}: no output line names path /{path_re}/ and line {lineno}:\n{out}"
    assert "AGW_TEST_SURELY_MISSING_VAR" in out, f"the missing variable is not named:\n{out}"


def test_check_rejects_a_missing_file(tmp_path):
    p = run("check", "-c", str(tmp_path / "nope.yaml"))
    assert p.returncode == 1, p


KEY_RE = re.compile(r"\bagw_[A-Za-z0-9_-]{43,}")


def test_keys_new_prints_a_key_and_its_yaml_entry():
    p = run("keys", "new", "--client", "support-bot")
    assert p.returncode == 0, p.stderr
    keys = KEY_RE.findall(p.stdout)
    assert len(set(keys)) == 1, f"expected one key in:\n{p.stdout}"
    key = keys[0]
    assert not re.search(r"[^A-Za-z0-9_-]", key[4:])
    hashes = re.findall(r"sha256:\s*['\"]?([0-9a-f]{64})\b", p.stdout)
    assert hashes == [agw.sha256_hex(key)], f"YAML entry does not carry the key's SHA-256:\n{p.stdout}"
    assert "support-bot" in p.stdout

    # the CLI agrees with itself and with hashlib
    h = run("keys", "hash", input=key + "\n")
    assert h.returncode == 0, h.stderr
    assert h.stdout.strip() == agw.sha256_hex(key)

    # two keys are never the same (256 random bits)
    p2 = run("keys", "new")
    assert p2.returncode == 0
    assert KEY_RE.findall(p2.stdout)[0] != key


def test_keys_hash_matches_sha256():
    # SPEC §3's example hash is the SHA-256 of "test"
    for stdin in ("test", "test\n"):
        p = run("keys", "hash", input=stdin)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    p = run("keys", "hash", input=agw.KEY + "\n")
    assert p.stdout.strip() == agw.KEY_SHA256


def test_a_new_key_works_end_to_end(mock, gateway):
    """keys new → paste the printed hash into the file → the key is accepted."""
    p = run("keys", "new", "--client", "fresh")
    key = KEY_RE.findall(p.stdout)[0]
    digest = re.findall(r"sha256:\s*['\"]?([0-9a-f]{64})\b", p.stdout)[0]
    m = mock("eastus-a")
    cfg = agw.single(m, clients=[agw.client("fresh", keys=[digest])])
    gw = gateway(cfg)
    resp = agw.azure_client(gw, key=key).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert resp.choices[0].message.content == "Hello from eastus-a."
