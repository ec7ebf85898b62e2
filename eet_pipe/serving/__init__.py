"""The HTTP serving layer: options, continuous-batching scheduler, OpenAI-compatible API, metrics.

Start it with ``python -m eet_pipe.serve`` (see `eet_pipe.serve`); docs/SERVE.md describes the API.
"""

__all__: list[str] = []
