"""The profiling layer: measuring blocks on a device, and fitting the estimators on it.

``loom profile`` (``profile``) times every block of every partition on every processor
and a sample of placed configs end to end, into a profile dataset (``dataset``) stamped
with the machine's fingerprint, and calibrates the links from it (``links``); ``remote``
does the same on another machine over ssh or adb. ``loom fit`` (``fitting``) turns a
dataset into ``Estimates``, the latency and accuracy estimators the planner reads.
Above ``loom.processors``, below ``loom.serving``; design notes in ``docs/profiling.md``.
"""
