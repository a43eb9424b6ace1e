"""Our own Gearman protocol code: the binary codec, the worker runtime, the admin text
protocol and a small client (used by tests, benchmarks and `gearvisor` itself).

- protocol: packet framing and the packet types we speak;
- worker: a child's connections to every job server, GRAB/PRE_SLEEP, graceful stop;
- admin: `status`/`workers` over the text protocol, parsed with bounds;
- client: submit jobs (foreground and background).
"""
