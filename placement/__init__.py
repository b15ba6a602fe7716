"""Placement: which plans (config x placement) each task runs, and in what mix and order.

``plan`` (``TaskSpace``, ``Plan``), ``tables`` (a space as arrays, the DP over slots),
``pareto`` and ``labels`` (per-task Pareto plans), ``points``/``lp``/``assignment``
(the joint LP mix and the fluid goodput bound), ``queueing`` (a queueing-aware mix),
``ordering`` (sharing-aware job order), ``policies`` (the compared policies),
``synthetic`` (random spaces, timing). Imports from ``loom`` only ``loom.core``.
Design: ``docs/placement.md``.
"""
