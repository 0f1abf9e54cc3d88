"""dico's command line: ``python cli.py <command> ...`` (installed as ``dico``).

Tools:  model-info   parameters, Gflops and shapes of a named model
Run ``python cli.py <command> --help`` for a command's options. This file only parses and dispatches:
the work is done by functions in ``dico/``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from jsonargparse import ArgumentParser


def model_info(argv: list[str]) -> int:
    from dico.models import list_models
    from dico.profiling import model_info as info

    parser = ArgumentParser(prog="dico model-info", description="Parameters, Gflops (MACs) and shapes of a model.")
    parser.add_argument("--model", required=True, choices=list_models(), help="registered model name")
    parser.add_argument("--image-size", type=int, default=256, choices=[256, 512], help="image resolution")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    result = info(args.model, image_size=args.image_size)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>14}: {value}")
    return 0


TOOLS: dict[str, Callable[[list[str]], int]] = {
    "model-info": model_info,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command in TOOLS:
        return TOOLS[command](rest)
    print(f"unknown command {command!r}; choose one of: {', '.join(TOOLS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
