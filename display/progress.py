"""
bench.py's progress line: where it is in which strategy, and the time left.
"""
import sys
import time


def progress_printer(total, n):
    """progress(s, name, i): a terminal gets one line rewritten in place; a log file a line
    every 30 s."""
    t0, tty, last = time.perf_counter(), sys.stderr.isatty(), [time.perf_counter()]

    def progress(s, name, i):
        now, done = time.perf_counter(), s * n + i
        if not tty and i < n and now - last[0] < 30:
            return
        last[0] = now
        eta = (now - t0) / done * (total - done)
        line = f"{name:<22} {i}/{n} | overall {done}/{total} | ETA {int(eta // 60)}:{int(eta % 60):02d}"
        print("\r" + line + "   " if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    return progress
