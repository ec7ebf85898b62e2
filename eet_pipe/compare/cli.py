"""Command line of the precision comparison tool: `python -m eet_pipe.compare model=... a=... b=...`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import torch

from eet_pipe.compare.core import Side, compare
from eet_pipe.generation.sequences import pad_prompts
from eet_pipe.loading.presets import SEED_RENAMED, resolve_model
from eet_pipe.loading.units import tokenizer_for

__all__ = ["main"]

log = logging.getLogger("eet_pipe.compare")

_KEYS = {"model": "checkpoint dir, HF-cache name or preset (required)",
         "a": "side A spec (default hf): hf | eet[:dtype=fp16|bf16,device=..,stages=N,ops=reference,model=..]",
         "b": "side B spec (default eet)",
         "prompt": "text, tokenized with the model's tokenizer",
         "ids": "token ids, e.g. 1,2,3 (several sequences: 1,2,3;4,5, left-padded)",
         "points": "comma-separated points or prefixes (e.g. layers.3,head); default all",
         "weights": "random: seeded random weights (presets); default: the checkpoint",
         "weights_seed": "seed of random weights (default 0)",
         "tol": "one max-abs bound for every point instead of the dtype-based tolerance",
         "topk": "show the K largest errors (with indices) of each failing point"}


_INTS = ("weights_seed", "seed", "topk")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eet_pipe.compare",
                                     epilog="every --key value is also accepted as key=value",
                                     description="Compare two sides (hf, eet, eet:stages=N, ...) at every canonical point.")
    for key, desc in _KEYS.items():
        parser.add_argument(f"--{key}", type=int if key in _INTS else float if key == "tol" else str, help=desc)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # the old --weights_seed, for one release
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    parser.add_argument("overrides", nargs="*", help="key=value options (the keys above)")
    return parser


def _options(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags and key=value items in one namespace; ValueError on an unknown key or a bad number."""
    args = _parser().parse_args(argv)
    for item in args.overrides:
        key, eq, value = item.partition("=")
        if not eq or key not in (*_KEYS, "seed"):
            raise ValueError(f"{item!r} is not key=value with a key among {', '.join(_KEYS)}")
        try:
            setattr(args, key, int(value) if key in _INTS else float(value) if key == "tol" else value)
        except ValueError as err:
            raise ValueError(f"{key}={value!r} is not a number") from err
    if args.seed is not None:
        log.warning(SEED_RENAMED)
        args.weights_seed = args.seed if args.weights_seed is None else args.weights_seed
    if not args.model:
        raise ValueError("model= is required (checkpoint directory, HF-cache name or preset)")
    if (args.prompt is None) == (args.ids is None):
        raise ValueError("pass exactly one of prompt=\"text\" or ids=1,2,3")
    return args


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] and mask [B, T] from prompt= (the model's tokenizer) or ids=."""
    if args.prompt is not None:
        tokenizer = tokenizer_for(resolve_model(args.model, args.weights, args.weights_seed or 0))
        if tokenizer is None:
            raise ValueError(f"model {args.model!r} has no tokenizer: pass ids=1,2,3 instead of prompt=")
        return pad_prompts([tokenizer.encode(args.prompt)])
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in args.ids.split(";")]
    except ValueError as err:
        raise ValueError(f"ids={args.ids!r} is invalid: comma-separated integers, ';' between sequences") from err
    if not all(rows):
        raise ValueError(f"ids={args.ids!r} has an empty sequence")
    return pad_prompts(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: 0 all points pass, 1 some fail, 2 usage or input error."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the table is the output; HF's loading bars would only add noise
    try:
        args = _options(argv)
        ids, mask = _inputs(args)
        sides = [Side.parse(spec, args.model, args.weights, args.weights_seed or 0)
                 for spec in (args.a or "hf", args.b or "eet")]
        points = [p for p in (args.points or "").split(",") if p] or None
        report = compare(sides[0], sides[1], ids, mask, points=points, tol=args.tol, topk=args.topk or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.table())
    return 0 if report.passed else 1
