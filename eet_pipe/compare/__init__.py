"""Precision comparison by canonical name: `core` (the comparison), `points` (capture points and
hooks), `cli` (`python -m eet_pipe.compare`)."""
