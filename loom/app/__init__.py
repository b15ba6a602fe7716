"""The application layer: from an SLO config to a running, measured system.

``config`` and ``arrivals`` read the SLO config and draw its seeded trace; ``deployment``
wires a device, partitions, estimators and task spaces into plans and runtimes;
``control`` applies SLO changes and re-planning during a run; ``run`` serves a trace
with real inference and ``simulate`` (with ``sim_*``) the same trace on a discrete-event
simulator that runs the real scheduling code; ``serve`` and ``scenario`` are the
plan/serve/bench commands and their load knobs; ``demo`` is ``loom demo``. Design
notes: ``docs/app.md``.
"""
