#!/usr/bin/env python3
"""Pulls a closure from a binary cache the way Nix does, and times it (scripts/bench-closure).

The method of the public comparisons of binary caches: resolve every narinfo, download every NAR
once to warm up, then time (a) every narinfo in turn over one keep-alive connection and (b)
every NAR once with N workers taking URLs from one shared queue, each on its own keep-alive
connection, bodies read to the end and counted (never decoded). Also times single small NARs on
a warm keep-alive connection: first byte and whole, median of 100.

    closure_pull.py BASE HASHES [--zstd] [--workers 1,4,16] [--repeats 3] [--warm 1]

BASE is http://host:port, HASHES a file of store path hashes (one per line). With --zstd the
client sends `Accept-Encoding: zstd` (harmonia compresses the plain NAR that way). Prints one
JSON object.
"""

import argparse
import http.client
import json
import queue
import statistics
import sys
import threading
import time
import urllib.parse

CHUNK = 1 << 18


class Client:
    """One keep-alive connection."""

    def __init__(self, base, zstd):
        u = urllib.parse.urlsplit(base)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
        self.headers = {"Accept-Encoding": "zstd"} if zstd else {}

    def get(self, path):
        """GET `path`, body drained: (status, body bytes, seconds to the headers, seconds)."""
        start = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        resp = self.conn.getresponse()
        first = time.perf_counter() - start
        n = 0
        while True:
            b = resp.read(CHUNK)
            if not b:
                break
            n += len(b)
        if resp.status != 200:
            raise SystemExit(f"GET {path}: {resp.status}")
        if resp.getheader("Connection", "").lower() == "close":
            raise SystemExit(f"GET {path}: the server closed the keep-alive connection")
        return n, first, time.perf_counter() - start

    def text(self, path):
        self.conn.request("GET", path, headers=self.headers)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise SystemExit(f"GET {path}: {resp.status}")
        return body.decode()


def resolve(base, hashes):
    """Every narinfo → (NAR URL path, NarSize)."""
    c = Client(base, False)
    nars = []
    for h in hashes:
        fields = dict(line.split(": ", 1) for line in c.text(f"/{h}.narinfo").splitlines() if ": " in line)
        url = fields["URL"]
        nars.append(("/" + url if not url.startswith("/") else url, int(fields["NarSize"])))
    return nars


def narinfo_pass(base, hashes):
    c = Client(base, False)
    start = time.perf_counter()
    for h in hashes:
        c.get(f"/{h}.narinfo")
    return time.perf_counter() - start


def nar_pass(base, urls, workers, zstd):
    """Seconds until `workers` connections drained every URL from one queue; bytes read."""
    q = queue.Queue()
    for u in urls:
        q.put(u)
    total = [0]
    errors = []
    lock = threading.Lock()

    def work():
        c = Client(base, zstd)
        n = 0
        try:
            while True:
                try:
                    u = q.get_nowait()
                except queue.Empty:
                    break
                n += c.get(u)[0]
        except BaseException as e:  # reported after the pass
            errors.append(e)
        with lock:
            total[0] += n

    threads = [threading.Thread(target=work) for _ in range(workers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{base}: {errors[0]}")
    return elapsed, total[0]


def small(base, nars, zstd):
    """First byte and whole of the NARs nearest 20 KB, on one warm connection: medians in ms."""
    near = sorted(nars, key=lambda n: abs(n[1] - 20_000))[:10]
    c = Client(base, zstd)
    for u, _ in near:
        c.get(u)
    firsts, wholes = [], []
    for i in range(100):
        _, first, whole = c.get(near[i % len(near)][0])
        firsts.append(first * 1000)
        wholes.append(whole * 1000)
    return statistics.median(firsts), statistics.median(wholes), statistics.median(n[1] for n in near)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("hashes")
    p.add_argument("--zstd", action="store_true")
    p.add_argument("--workers", default="1,4,16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warm", type=int, default=1, help="warm-up downloads of every NAR")
    a = p.parse_args()
    hashes = [h.strip() for h in open(a.hashes) if h.strip()]
    nars = resolve(a.base, hashes)
    urls = [u for u, _ in nars]
    for _ in range(a.warm):
        nar_pass(a.base, urls, 4, a.zstd)
    out = {"paths": len(hashes), "nar_size": sum(s for _, s in nars)}
    out["narinfo_s"] = statistics.median(narinfo_pass(a.base, hashes) for _ in range(a.repeats))
    out["nar_s"] = {}
    for w in (int(x) for x in a.workers.split(",")):
        runs = [nar_pass(a.base, urls, w, a.zstd) for _ in range(a.repeats)]
        out["nar_s"][str(w)] = statistics.median(r[0] for r in runs)
        out["bytes"] = runs[0][1]
    first, whole, size = small(a.base, nars, a.zstd)
    out["small"] = {"nar_size": size, "first_ms": first, "whole_ms": whole}
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
