"""Log reading and replay speed, and proof that memory does not grow with the log.

    .venv/bin/python benchmarks/bench_logformat.py [--mib 1024] [--write-kib 64]

Writes a synthetic log of about --mib MiB (writes of --write-kib KiB, a flush every 16 writes,
an in-band tick marker every 64) on disk, then scans it (headers only), summarises it, and replays
it onto a sparse image. Prints entries/s, MiB/s, the peak resident memory of the process before
and after, and the ratio of that growth to the log's size: data stays in the file (mmap), so the
growth is the header index, not the data.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from crashlab import logformat, markers


def rss_mib() -> dict[str, float]:
    """Resident memory by kind: anonymous (the process's own) and file-backed (mapped log pages,
    clean page cache the kernel can drop at will)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--write-kib", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="crashlab-bench-", dir="/var/tmp") as tmp:
        log, image = Path(tmp) / "big.log", Path(tmp) / "image"
        data = os.urandom(args.write_kib << 10)
        writes = (args.mib << 20) // len(data)
        t0 = time.perf_counter()
        with logformat.LogWriter(log) as w:
            for i in range(writes):
                w.write((i * len(data) // 512) % (1 << 21), data)
                if i % 16 == 15:
                    w.flush()
                if i % 64 == 63:
                    w.write(1 << 22, markers.encode(markers.Marker(i, i * 1000, markers.TICK)))
        size = log.stat().st_size
        print(f"wrote {size / 2**20:.0f} MiB log, {writes} writes, in {time.perf_counter() - t0:.1f} s")
        os.posix_fadvise(os.open(log, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)

        rss0 = rss_mib()
        with logformat.open_log(log) as reader:
            t0 = time.perf_counter()
            n = len(reader.index())
            scan = time.perf_counter() - t0
            t0 = time.perf_counter()
            s = reader.summary()
            summ = time.perf_counter() - t0
            t0 = time.perf_counter()
            logformat.replay(reader, image)
            rep = time.perf_counter() - t0
            rss1 = rss_mib()
        assert s.entries == n and s.writes == writes
        mib = size / 2**20
        print(f"scan     {n} entries in {scan:.2f} s: {n / scan:,.0f} entries/s, {mib / scan:,.0f} MiB/s")
        print(f"summary  {summ:.2f} s (from the cached index)")
        print(f"replay   {rep:.2f} s: {s.bytes_written / 2**20 / rep:,.0f} MiB/s of data written")
        anon = rss1["RssAnon"] - rss0["RssAnon"]
        print(f"memory   anonymous +{anon:.1f} MiB for a {mib:.0f} MiB log (ratio {anon / mib:.4f}, "
              f"{anon * 2**20 / n:.0f} B per entry); mapped log pages resident "
              f"{rss1['RssFile'] - rss0['RssFile']:.0f} MiB (page cache, dropped under pressure)")


if __name__ == "__main__":
    main()
