"""Fixtures of the aoai-gateway integration tests (see agw.py for the harness itself).

- `mock(name, **flags)`   start an aoai-mock, returns agw.Mock (.url .port .faults() .requests()
                          .data_requests() .clear() .stats())
- `gateway(config, env)`  start aoai-gateway on a config dict, returns agw.Gateway (.url
                          .admin_url .audit_lines() .audit_for(id) .proc .config_path)
- `cluster`               the agw.Cluster behind both (function scope)
- `module_cluster`        a Cluster shared by one test module, for read-only gateways

Processes are stopped at teardown (SIGTERM, SIGKILL after 5 s); the output of every process of a
failed test is attached to its report.
"""

from __future__ import annotations

import pytest

import agw

_ACTIVE: list[agw.Cluster] = []


@pytest.fixture(scope="session")
def session_cluster(tmp_path_factory):
    c = agw.Cluster(tmp_path_factory.mktemp("session"))
    _ACTIVE.append(c)
    yield c
    _ACTIVE.remove(c)
    c.close()


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory, session_cluster, request):
    c = agw.Cluster(tmp_path_factory.mktemp(request.module.__name__), parent=session_cluster)
    _ACTIVE.append(c)
    yield c
    _ACTIVE.remove(c)
    problems = c.close()
    if problems:
        pytest.fail("\n\n".join(problems))


@pytest.fixture
def cluster(tmp_path, session_cluster):
    c = agw.Cluster(tmp_path, parent=session_cluster)
    _ACTIVE.append(c)
    yield c
    _ACTIVE.remove(c)
    problems = c.close()
    if problems:
        pytest.fail("\n\n".join(problems))


@pytest.fixture
def fresh(env):
    """A module's shared `env` (gateway, mock) with the mock's request record cleared."""
    gw, m = env
    m.clear()
    return gw, m


@pytest.fixture
def mock(cluster):
    return cluster.mock


@pytest.fixture
def gateway(cluster):
    return cluster.gateway


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for c in list(_ACTIVE):
            for proc in c.procs:
                rep.sections.append((f"process {proc.label}", proc.tail(4000)))
