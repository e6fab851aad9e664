"""Watching a run: health checks, metrics, communication counts, faults and the watchdog."""
