"""corral's supervisor: HTTP APIs, model store, scheduling and runner processes.

Never imports mlx or mlx_lm: this process stays small and holds no
accelerator memory. Models run in `runner` subprocesses.
"""

__version__ = "0.1.0"
