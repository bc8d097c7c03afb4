"""Mail server for `duration` seconds of guest time: a steady, never-synced maillog beside an
fsync'd spool, so the kernel's background writeback pushes the maillog out between durability points.

Long enough for the volatility window to bite (DESIGN.md, "Cache modes"): the guest's own writeback
(dirty_expire 30 s, flusher every 5 s) writes each maillog chunk out about 30 s after it was written,
without a flush, while deliveries every few seconds make promises.

Params: `duration` seconds (default 60), `rate` KiB/s of maillog (default 256, times the scale),
`deliver` mean seconds between deliveries (default 2). The run is a fixed number of 100 ms steps:
every operation and byte depends on the seed and params only, and the clock only paces the steps (a
slow guest takes longer, never does less).

Promises: after a delivery, the message has exactly its content and the spool's queue log (appended,
fdatasync'd) holds at least its records; after an expunge, the message is gone. The maillog is never
promised: fsck alone judges it.
"""

from __future__ import annotations

import os
import time

from crashlab import oracle
from crashlab.workload import WorkloadContext, fsync_dir, write_file

STEP_S = 0.1
MAILLOG = "log/maillog"
QUEUE = "spool/queue.log"
FOLDERS = ("spool/new", "spool/cur")
EXPUNGE_P = 0.3  # of a step without a delivery, times the delivery chance: a spool that stays small


def positive(ctx: WorkloadContext, key: str, default: str) -> float:
    text = ctx.param(key, default) or default
    try:
        value = float(text)
    except ValueError:
        raise SystemExit(f"mailserver: {key}={text!r} is not a number") from None
    if not value > 0:
        raise SystemExit(f"mailserver: {key} must be > 0, not {text}")
    return value


def run(ctx: WorkloadContext) -> None:
    duration = positive(ctx, "duration", "60")
    chunk = round(positive(ctx, "rate", "256") * 1024 * STEP_S * ctx.scale)
    p_deliver = min(1.0, STEP_S / positive(ctx, "deliver", "2"))
    rng = ctx.rng
    for d in ("log", *FOLDERS):
        (ctx.root / d).mkdir(parents=True, exist_ok=True)
    log = os.open(ctx.root / MAILLOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    queue = os.open(ctx.root / QUEUE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.fsync(queue)
        for d in ("spool", *FOLDERS):
            fsync_dir(ctx.root / d)
        fsync_dir(ctx.root)
        chain, records = oracle.LOG_CHAIN_START, 0
        ctx.durable("server-ready", [oracle.log_prefix(QUEUE, 0, chain)])
        spool: list[str] = []
        t0 = time.monotonic()
        for step in range(max(1, round(duration / STEP_S))):
            os.write(log, rng.randbytes(rng.randint(chunk // 2, chunk * 3 // 2)))
            roll = rng.random()
            if roll < p_deliver:
                name = f"{rng.choice(FOLDERS)}/msg{step:06d}"
                head = f"From: crashlab\nMessage-Id: {step}\n\n".encode()
                body = head + rng.randbytes(rng.randint(200, 12000))
                write_file(ctx.root / name, body)
                fsync_dir((ctx.root / name).parent)
                os.write(queue, oracle.log_record(records, name.encode()))
                os.fdatasync(queue)
                chain, records = oracle.log_chain(chain, name.encode()), records + 1
                spool.append(name)
                ctx.durable(f"deliver-{step}", [oracle.file_state(name, body),
                                                oracle.log_prefix(QUEUE, records, chain)])
            elif spool and roll < p_deliver * (1 + EXPUNGE_P):
                victim = spool.pop(rng.randrange(len(spool)))
                os.unlink(ctx.root / victim)
                fsync_dir((ctx.root / victim).parent)
                ctx.durable(f"expunge-{step}", [oracle.absent(victim)])
            time.sleep(max(0.0, t0 + (step + 1) * STEP_S - time.monotonic()))
    finally:
        os.close(log)
        os.close(queue)
