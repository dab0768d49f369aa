"""pytest fixtures for nginx-authentik's end-to-end tests.

Targets: NGINX_TARGETS (default "debian vendored") selects which nginx builds the
tests run against; every test that uses nginx is parametrized over them (test ids
show the target).  A selected target whose nginx binary or module .so is missing
makes its tests fail with a message naming the missing file.

Fixtures:
  target      the target name (parametrized)
  nginx       a harness.Nginx under a private prefix (not started); stopped at teardown
  provider    the node OIDC provider (module scope: shared by the tests of one file in
              one xdist worker; tests register their own clients)
  upstream    the upstream echo server (module scope)
  app         harness.App: nginx + provider + upstream with a standard config
  browser     a harness.Browser; `browsers()` makes more
  make_provider  factory for a provider of the test's own (port, ttl, clients), stopped at teardown
"""

import os

import pytest

import harness
from harness import TARGETS, App, Browser, Nginx, Provider, Upstream

harness.install_test_resolver()


def selected_targets():
    names = os.environ.get("NGINX_TARGETS", "debian vendored").split()
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise pytest.UsageError(f"NGINX_TARGETS: unknown target(s) {unknown}; known: {sorted(TARGETS)}")
    return names


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes several seconds")
    selected_targets()


def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        names = selected_targets()
        metafunc.parametrize("target", names, ids=names, scope="module")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


def _failed(request):
    rep = getattr(request.node, "rep_call", None)
    return rep is not None and rep.failed


@pytest.fixture
def nginx(request, target, tmp_path):
    n = Nginx(target, tmp_path / "nginx")
    yield n
    n.stop()
    if _failed(request):
        print(f"--- nginx ({target}) error.log tail ---")
        print(n.error_log()[-6000:])


@pytest.fixture(scope="module")
def provider(tmp_path_factory):
    p = Provider(tmp_path_factory.mktemp("provider"))
    try:
        p.start()
        yield p
    finally:
        p.stop()


@pytest.fixture
def make_provider(tmp_path):
    started = []

    def make(port=0, clients=None, ttl=None, issuer=None, start=True):
        p = Provider(tmp_path / f"provider{len(started)}", port=port, clients=clients, ttl=ttl, issuer=issuer)
        started.append(p)
        if start:
            p.start()
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    u = Upstream(tmp_path_factory.mktemp("upstream"))
    try:
        u.start()
        yield u
    finally:
        u.stop()


@pytest.fixture
def app(nginx, provider, upstream):
    provider.reset()
    a = App(nginx, provider, upstream)
    yield a
    try:
        provider.reset()
    except Exception:
        pass


@pytest.fixture
def browsers():
    made = []

    def make(**kw):
        b = Browser(**kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def browser(browsers):
    return browsers()
