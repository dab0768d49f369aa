"""Background work: the heartbeat task of worker 0 (src/background.rs).

The task runs on a thread of worker 0, writes a beat (counter, unix time, its pid) into a
shared zone every second, and every worker reads it as $authentik_background_heartbeat.
These tests check: one writer seen by every worker, a new writer after a reload (also while
the old worker 0 is kept alive by a connection), after kill -9, requests never delayed,
and a prompt, crash-free exit.
"""

import http.client
import os
import signal
import subprocess
import time

import pytest

from harness import fresh_get

CONF = """
authentik_session_zone zone=authentik:1m;
authentik_provider main {
    issuer        http://127.0.0.1:9/never-contacted/;
    client_id     background-test;
    client_secret background-secret;
    external_host http://127.0.0.1:@PORT@;
}
server {
    listen 127.0.0.1:@PORT@;
    client_header_timeout 60s;
    location = /hb {
        auth_authentik off;
        return 200 "$pid|$authentik_background_heartbeat\\n";
    }
    location / {
        auth_authentik main;
        return 204;
    }
}
"""

BEAT_INTERVAL = 1.0


class Sample:
    """One read of the heartbeat: which worker answered, and what it saw."""

    def __init__(self, body: str, at: float):
        served, _, beat = body.strip().partition("|")
        self.served = int(served)
        self.at = at
        self.raw = beat
        if beat:
            beats, t, writer = beat.split(" ")
            self.beats, self.time, self.writer = int(beats), int(t), int(writer)
        else:
            self.beats = self.time = self.writer = None

    def __repr__(self):
        return f"Sample(served={self.served}, beats={self.beats}, time={self.time}, writer={self.writer})"


def sample(nginx) -> Sample:
    r = fresh_get(nginx.url("/hb"), timeout=5)
    assert r.status_code == 200, r.text
    return Sample(r.text, time.monotonic())


def wait_for(nginx, cond, timeout=10.0, what="heartbeat"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = sample(nginx)
        if cond(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not seen within {timeout}s, last {last}")


def samples_for(nginx, seconds, step=0.1) -> list[Sample]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out.append(sample(nginx))
        time.sleep(step)
    return out


def assert_advancing(samples, seconds):
    """The counter and the time of the last beat advance: about one beat a second."""
    first, last = samples[0], samples[-1]
    assert all(s.beats is not None for s in samples), samples
    beats = [s.beats for s in samples]
    assert beats == sorted(beats), f"heartbeat went backwards: {beats}"
    assert last.beats - first.beats >= int(seconds / BEAT_INTERVAL) - 1, (first, last)
    assert last.time > first.time, (first, last)


def crashes(nginx) -> list[str]:
    return [line for line in nginx.error_log().splitlines() if "exited on signal" in line]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return
        time.sleep(0.05)
    raise AssertionError(f"processes {[p for p in pids if alive(p)]} still alive after {timeout}s")


def test_one_writer_seen_by_every_worker(nginx):
    nginx.start(CONF, worker_processes=2)
    workers = nginx.workers()
    assert len(workers) == 2
    wait_for(nginx, lambda s: s.beats is not None)
    samples = samples_for(nginx, 3.0, step=0.05)
    served = {s.served for s in samples}
    assert served == workers, f"fresh connections reached {served}, workers are {workers}"
    writers = {s.writer for s in samples}
    assert len(writers) == 1, f"more than one writer: {writers}"
    assert writers <= workers, (writers, workers)
    # every worker reads the same memory: in request order the counter never goes back,
    # and both workers see the same beat within one interval
    assert_advancing(samples, 3.0)
    for w in workers:
        seen = [s.beats for s in samples if s.served == w]
        assert max(seen) >= samples[-1].beats - 1, (w, seen, samples[-1])
    started = [line for line in nginx.error_log().splitlines()
               if 'background task "heartbeat" started' in line]
    assert len(started) == 1, started
    assert crashes(nginx) == []


def test_reload_hands_over_to_new_worker(nginx):
    nginx.start(CONF, worker_processes=2)
    before = wait_for(nginx, lambda s: s.beats is not None)
    old_workers = nginx.workers()
    new_workers = nginx.reload()
    after = wait_for(nginx, lambda s: s.writer in new_workers, what="a beat from a new worker")
    assert after.writer != before.writer
    wait_gone(old_workers)
    samples = samples_for(nginx, 3.0)
    assert {s.writer for s in samples} == {after.writer}, samples
    assert_advancing(samples, 3.0)
    # the zone is reused across the reload: the counter goes on
    assert samples[0].beats > before.beats, (before, samples[0])
    assert crashes(nginx) == []


def connection_to(nginx, pid, tries=100) -> http.client.HTTPConnection:
    """A keep-alive connection whose first request was served by worker `pid`."""
    for _ in range(tries):
        conn = http.client.HTTPConnection("127.0.0.1", nginx.port, timeout=5)
        if keepalive_sample(conn).served == pid:
            return conn
        conn.close()
    raise AssertionError(f"no connection reached worker {pid} in {tries} tries")


def keepalive_sample(conn: http.client.HTTPConnection) -> Sample:
    conn.request("GET", "/hb")
    r = conn.getresponse()
    body = r.read().decode()
    assert r.status == 200, body
    return Sample(body, time.monotonic())


def test_reload_stops_old_task_while_old_worker_drains(nginx):
    """An old worker 0 kept alive by a connection stops its task when it starts shutting
    down, not when it finally exits: only the new worker writes."""
    nginx.start(CONF, worker_processes=2)
    writer = wait_for(nginx, lambda s: s.beats is not None).writer
    held = connection_to(nginx, writer)
    try:
        # a request that has started (not an idle keep-alive): the worker must wait for it
        held.sock.sendall(b"GET /hb HTTP/1.1\r\n")
        time.sleep(0.2)  # read by the worker before it hears of the reload
        new_workers = nginx.reload()
        wait_for(nginx, lambda s: s.writer in new_workers, what="a beat from a new worker")
        time.sleep(1.5)  # the old worker's supervisor notices the shutdown within a second
        samples = samples_for(nginx, 3.0)
        assert alive(writer), "the old worker 0 exited: the test did not keep it draining"
        writers = {s.writer for s in samples}
        assert len(writers) == 1 and writers <= new_workers, f"writers {writers}, old {writer}"
        assert_advancing(samples, 3.0)
        assert "worker is shutting down, stopping background tasks" in nginx.error_log()
    finally:
        held.close()
    wait_gone([writer])
    assert crashes(nginx) == []


def test_killed_worker_is_respawned_and_resumes(nginx):
    nginx.start(CONF, worker_processes=2)
    before = wait_for(nginx, lambda s: s.beats is not None)
    os.kill(before.writer, signal.SIGKILL)
    wait_gone([before.writer])
    workers = nginx.wait_workers(2, exclude={before.writer})
    after = wait_for(nginx, lambda s: s.writer is not None and s.writer != before.writer,
                     what="a beat from the respawned worker")
    assert after.writer in workers, (after, workers)
    samples = samples_for(nginx, 3.0)
    assert {s.writer for s in samples} == {after.writer}, samples
    assert_advancing(samples, 3.0)
    assert samples[0].beats > before.beats
    lines = crashes(nginx)
    assert len(lines) == 1 and f" {before.writer} exited on signal 9" in lines[0], lines


def test_requests_not_delayed(nginx):
    """50 requests over 2.5 s (2 beats or more), alternating between a keep-alive connection
    to the worker that runs the task and one to the other worker (fresh connections would
    dodge a stalled worker: the other one accepts them), each answered within a generous
    bound that a worker whose event loop waits for the task could not meet."""
    nginx.start(CONF, worker_processes=2)
    writer = wait_for(nginx, lambda s: s.beats is not None).writer
    (other,) = nginx.workers() - {writer}
    conns = [connection_to(nginx, writer), connection_to(nginx, other)]
    try:
        slowest = 0.0
        for i in range(50):
            t0 = time.monotonic()
            s = keepalive_sample(conns[i % 2])
            elapsed = time.monotonic() - t0
            slowest = max(slowest, elapsed)
            assert s.served == (writer, other)[i % 2] and s.writer == writer, s
            time.sleep(0.05)
    finally:
        for c in conns:
            c.close()
    assert slowest < 0.5, f"slowest request took {slowest:.3f}s"
    assert crashes(nginx) == []


@pytest.mark.parametrize("how", ["quit", "stop"])
def test_exit_is_prompt(nginx, how):
    """`nginx -s quit` (graceful) and `nginx -s stop` (fast): the master is gone soon, no
    worker waited for or crashed on the thread."""
    nginx.start(CONF, worker_processes=2)
    wait_for(nginx, lambda s: s.beats is not None)
    workers = nginx.workers()
    t0 = time.monotonic()
    r = subprocess.run(nginx._cmd(nginx.conf_path, "-s", how), capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    nginx.proc.wait(timeout=10)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, f"nginx -s {how} took {elapsed:.2f}s"
    wait_gone(workers, timeout=1)
    log = nginx.error_log()
    assert crashes(nginx) == []
    assert "did not stop within" not in log
    assert 'background task "heartbeat" stopped' in log
    assert "panicked" not in log
