#!/usr/bin/env python3
"""How much store memory N sessions take (README, "Sizing"), measured on a private
redis-server: each session is written exactly as the module writes it at login (SET of the
stored record with EX, the user's and the authentik session's id sets with their EXPIREs),
with a typical authentik record (1856 bytes: the core test
`typical_authentik_session_fits_a_2k_slot`, 10 groups, a 1 KB access token).

    bench/store_sizing.py [N]     (default 1000000)
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

RECORD = 1856 + 13  # the record plus the stored header (version, provider key, expiry)
TTL = 86400


def resp(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def info_memory(port: int) -> dict:
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "memory"], capture_output=True, text=True).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    work = tempfile.mkdtemp(prefix="store-sizing-")
    port = free_port()
    conf = os.path.join(work, "redis.conf")
    with open(conf, "w") as f:
        f.write(f"port {port}\nbind 127.0.0.1\ndir {work}\nsave \"\"\nappendonly no\n")
    server = subprocess.Popen(["redis-server", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        before = int(info_memory(port)["used_memory"])
        pipe = subprocess.Popen(["redis-cli", "-p", str(port), "--pipe"], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL)
        value = os.urandom(RECORD)
        ttl = str(TTL).encode()
        chunk = []
        for i in range(n):
            sid = os.urandom(32).hex().encode()
            key = b"authentik:s:" + sid
            sub = b"authentik:u:" + os.urandom(32).hex().encode()
            asid = b"authentik:d:" + os.urandom(32).hex().encode()
            chunk.append(resp(b"SET", key, value, b"EX", ttl))
            for s in (sub, asid):
                chunk.append(resp(b"SADD", s, sid))
                chunk.append(resp(b"EXPIRE", s, ttl, b"NX"))
            if len(chunk) >= 5000:
                pipe.stdin.write(b"".join(chunk))
                chunk = []
        pipe.stdin.write(b"".join(chunk))
        pipe.stdin.close()
        pipe.wait()
        mem = info_memory(port)
        used = int(mem["used_memory"]) - before
        rss = int(mem["used_memory_rss"])
        print(f"sessions: {n}")
        print(f"used_memory: {used / 2**30:.2f} GiB ({used / n:.0f} bytes/session), "
              f"rss {rss / 2**30:.2f} GiB, allocator {mem.get('mem_allocator', '?')}")
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
