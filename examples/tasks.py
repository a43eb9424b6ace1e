"""A JSON task that reports progress with WORK_STATUS while it works."""

import time


def wordcount(job):
    """Count words per line of {"lines": [...], "delay": seconds-per-line}.

    Sends a status update after each line, so `gearman -f wordcount` clients and
    GET_STATUS callers see progress; returns a dict, which is sent as JSON.
    """
    task = job.json()
    lines = task.get("lines", [])
    delay = float(task.get("delay", 0))
    counts = []
    for i, line in enumerate(lines, 1):
        counts.append(len(str(line).split()))
        if delay:
            time.sleep(delay)
        job.send_status(i, len(lines))
    return {"lines": len(lines), "words": sum(counts), "per_line": counts}


def sleep(job):
    """Sleep for the number of seconds in the payload (default 1), then answer "slept N"."""
    seconds = float(job.text() or 1)
    time.sleep(seconds)
    return f"slept {seconds:g}"
