#!/usr/bin/env python3
"""The ovirt-imageio client's download algorithm, without Go: the reference
row of scripts/bench.sh's oVirt table.

OPTIONS first; workers = min(max_readers, 4); extents (context=zero) fetched
once; data extents split into requests of at most 128 MiB, each one GET of
the whole request read in 4 MiB buffers; zero extents skipped (the output
is sparse). Usage: imageio-download.py TICKET_URL CA_FILE OUTPUT
"""
import http.client
import json
import queue
import ssl
import sys
import threading
import urllib.parse

MAX_REQUEST = 128 << 20
BUFFER = 4 << 20


def connect(url, ctx):
    return http.client.HTTPSConnection(url.hostname, url.port, context=ctx)


def main():
    ticket, ca, out = sys.argv[1:4]
    url = urllib.parse.urlparse(ticket)
    ctx = ssl.create_default_context(cafile=ca)
    con = connect(url, ctx)
    con.request("OPTIONS", url.path)
    resp = con.getresponse()
    options = json.loads(resp.read() or b"{}")
    workers = max(1, min(options.get("max_readers", 1), 4))
    con.request("GET", url.path + "/extents?context=zero")
    resp = con.getresponse()
    if resp.status != 200:
        sys.exit("extents: status %d" % resp.status)
    extents = json.loads(resp.read())
    con.close()
    size = extents[-1]["start"] + extents[-1]["length"] if extents else 0
    work = queue.Queue()
    for e in extents:
        if e.get("zero"):
            continue
        start, end = e["start"], e["start"] + e["length"]
        while start < end:
            n = min(MAX_REQUEST, end - start)
            work.put((start, n))
            start += n
    with open(out, "wb") as f:
        f.truncate(size)
    errors = []

    def worker():
        c = connect(url, ctx)
        with open(out, "r+b") as f:
            while not errors:
                try:
                    start, n = work.get_nowait()
                except queue.Empty:
                    return
                c.request("GET", url.path, headers={"Range": "bytes=%d-%d" % (start, start + n - 1)})
                r = c.getresponse()
                if r.status != 206 or int(r.getheader("Content-Length", "-1")) != n:
                    errors.append("GET %d+%d: status %d" % (start, n, r.status))
                    return
                f.seek(start)
                left = n
                while left:
                    buf = r.read(min(BUFFER, left))
                    if not buf:
                        errors.append("GET %d+%d: short body" % (start, n))
                        return
                    f.write(buf)
                    left -= len(buf)
        c.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit("; ".join(errors))


if __name__ == "__main__":
    main()
