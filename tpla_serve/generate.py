"""Generate from the command line: `python -m tpla_serve.generate --prompt "def fibonacci(n):"`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from tpla_serve.flags import HelpFormatter, add_engine_args, engine_config_from_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--prompt", action="append", help="prompt text; repeat for a batch (default: a sample)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    parser.add_argument("--json", action="store_true", help="print the full SGLang-shaped result as JSON")
    add_engine_args(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tpla_serve.entrypoints.engine import Engine

    engine = Engine(**dataclasses.asdict(engine_config_from_cli(args)))
    prompts = args.prompt or ["def fibonacci(n):"]
    params = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "sampling_seed": args.seed,
    }
    if args.stream:
        if len(prompts) != 1:
            sys.exit("--stream takes one --prompt")
        printed = 0
        sys.stdout.write(prompts[0])
        for out in engine.generate(prompts[0], params, stream=True):
            sys.stdout.write(out["text"][printed:])
            sys.stdout.flush()
            printed = len(out["text"])
        sys.stdout.write("\n")
        return
    outs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        if args.json:
            print(json.dumps(out))
        else:
            print(f"{prompt}{out['text']}")
            print(f"-- {out['meta_info']['completion_tokens']} tokens, finish: {out['meta_info']['finish_reason']}")


if __name__ == "__main__":
    main()
