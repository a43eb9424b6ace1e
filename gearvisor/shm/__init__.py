"""Shared memory between the master and its children, mapped before fork.

- scoreboard: one page per child, what it is doing now (a seqlock; no syscall per job);
- poison: which job each child runs and the strikes against job keys.
"""
