"""corral's runner: one model in one process, served over loopback HTTP.

This package must stay importable without mlx at the top level: the supervisor
imports `runner.protocol` (pure Python) for the wire format it shares with us.
"""
