"""The processors layer: what a machine runs blocks on.

A device profile (``device``) names a machine's processors (a backend with its options,
pinned to cores or a device), the links between them and what a hand-off costs; the
workers (``workers``) are one pinned thread per processor, and the chains of blocks placed
across them that the profiler measures and serving runs. Above ``loom.model``, below
``loom.profiling``; design notes in ``docs/devices.md``.
"""
