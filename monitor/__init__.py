"""Node health and recovery (docs/health.md); imports only ``slurm``.

Pure: :mod:`monitor.parse` (what nodes print), :mod:`monitor.checks` (NHC-style verdicts),
:mod:`monitor.ownership` (drain/resume rule), :mod:`monitor.recovery` (what to do about jobs
hit by node failures). Adapters: :mod:`monitor.probe` (bounded commands and filesystem probes),
:mod:`monitor.facts` (gathering under a watchdog), :mod:`monitor.health` (one run on a node),
:mod:`monitor.faults` (dev-cluster fault injection).
"""
