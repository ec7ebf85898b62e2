"""Typed options of the command-line entry points (`typed`) and their `key=value` parsing (`parse`)."""
