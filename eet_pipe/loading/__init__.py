"""Resolving and loading models: `presets` (`model=` resolution and the preset YAMLs), `units` (building
a model or a stage's units), `builtin` (the `tiny` model), `tokenizer`."""
