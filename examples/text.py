"""Text workers: the smallest useful examples."""


def reverse(job):
    """Reverse the payload as text: "hello" -> "olleh"."""
    return job.text()[::-1]


def upper(job):
    """Upper-case the payload."""
    return job.text().upper()


def echo(job):
    """Return the payload unchanged (bytes in, bytes out); used by tests and benchmarks."""
    return job.data
