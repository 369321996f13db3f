"""corral: an Ollama-style model server for MLX.

The code lives in two packages kept at the top of the repository and installed
under this namespace (setuptools package-dir mapping in pyproject.toml):
`corral.supervisor` (HTTP APIs, scheduling; never imports mlx) and
`corral.runner` (one model per subprocess, `python -m corral.runner`).
"""
