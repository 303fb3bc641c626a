"""`mobilevlm`: the library from a shell. Subcommands grow with the project; `ask` answers one question."""

import argparse
import logging
import sys
from collections.abc import Sequence

from mobilevlm_ros.errors import MobileVLMError

logger = logging.getLogger("mobilevlm")


def _ask(args: argparse.Namespace) -> int:
    from mobilevlm_ros.model.preprocess import load_image_file
    from mobilevlm_ros.model.prompt import build_prompt
    from mobilevlm_ros.runtime.vlm import MobileVLM

    build_prompt(args.question)  # an empty question fails before the model loads
    image = load_image_file(args.image)
    vlm = MobileVLM.from_pretrained(args.model, device=args.device)
    answer = vlm.ask(image, args.question, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    sys.stdout.write(answer + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobilevlm", description="MobileVLM on the edge: ask a camera image questions.")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity (stderr)")
    commands = parser.add_subparsers(dest="command", required=True)

    ask = commands.add_parser("ask", help="answer one question about one image")
    ask.add_argument("question", help="the question, e.g. 'What is on the table?'")
    ask.add_argument("--model", required=True, help="MobileVLM checkpoint directory (config.json, weights, tokenizer)")
    ask.add_argument("--image", required=True, help="image file (any format PIL reads)")
    ask.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit in tokens")
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ask.add_argument("--seed", type=int, default=None, help="sampling seed")
    ask.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    ask.set_defaults(run=_ask)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except MobileVLMError as error:
        sys.stderr.write(f"mobilevlm {args.command}: error: {error}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
