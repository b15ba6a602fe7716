"""The serving layer: runs several tasks' requests at once on a device's processors, each under its SLO.

``runtime.Runtime`` takes requests and resolves their futures; ``scheduler`` picks each
request's plan among its task's candidates from the processors' predicted backlogs
(``pricing``); ``pool``, ``edf`` and ``cache`` run it on one pinned earliest-deadline-first
worker per processor, loading blocks on demand; ``correction`` learns from measured block
times, ``preload`` keeps the hottest blocks within a memory budget, and ``metrics`` (with
``plots``) records every request. Design notes: docs/serving.md.
"""
