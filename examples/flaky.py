"""A deliberately flaky function, for demos of failures and restarts."""

import os
import random


def flaky(job):
    """Fail about a third of the time; crash the whole process on the payload "crash".

    - "crash": the child process dies (os._exit), gearvisor restarts it with backoff and
      gearmand hands the job to another worker.
    - "fail": always raises, so the client sees a failure with the error text.
    - anything else: raises one time in three, else echoes the payload in upper case.
    """
    text = job.text()
    if text == "crash":
        os._exit(17)
    if text == "fail" or random.random() < 1 / 3:
        raise RuntimeError(f"flaky failure on {text!r}")
    return text.upper()
