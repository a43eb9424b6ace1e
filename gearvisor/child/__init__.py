"""Life after fork: the one post-fork setup, the Python child runtime and command exec.

Nothing here runs in the master. The master forks, and the new process calls
`postfork.after_fork`, then either `python.run_child` (a Python pool: import the user's
functions, register on every server, run jobs) or `command.exec_command` (a command pool:
exec the user's program). Either way the process ends in os._exit and never returns into
master code.
"""
