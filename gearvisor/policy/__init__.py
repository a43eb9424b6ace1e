"""Pure decisions, no I/O and no clock of their own: callers pass `now`.

- child: the master's record of one child and its checked state transitions;
- pool: slots, the roll plan (surge, successors, halts), exit decisions, the circuit;
- backoff: restart backoff, the boot-error window, fd-limit warnings.

Unit tests drive these by hand with an injected clock.
"""
