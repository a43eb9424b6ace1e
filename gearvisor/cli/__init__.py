"""The command line: argument parsing, the subcommands, and rendering what the master replies.

`main` is the `gearvisor` console script. Everything here runs in the operator's process;
it talks to a running master only through the control socket (gearvisor.control).
"""
