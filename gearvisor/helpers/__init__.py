"""Helper processes the master forks and supervises (master/helper.py is their supervisor).

- watcher: runs watchfiles (threads) outside the master, so the master stays
  single-threaded and fork() stays safe; reports changed files as typed messages.
"""
