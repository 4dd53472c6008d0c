"""The LM job's training data as a chat-messages JSONL file, for `axolotl train examples/axolotl/deft_lm_sft.yml`:

    python -m deft_cli.demo.lm_data /tmp/deft-lm/sft.jsonl            # the IMDB review requests, seed 0
    python -m deft_cli.demo.lm_data OUT.jsonl --data FILE.jsonl --train-size 320 --seed 0

It writes the training records of `deft demo --job lm` with the same --data, --train-size, --eval-size and --seed
(the same split, the same order), one {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} per line:
Axolotl's chat_template dataset type renders them with the model's chat template and trains on the assistant turn,
the completion.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..checks import write_text
from ..data import DeftError
from .lm import load_lm_records
from .settings import LmSettings


def messages_of(record: dict) -> list[dict]:
    """A prompt/completion record as chat messages (chat-message records are kept as they are)."""
    as_messages = lambda x, role: x if isinstance(x, list) else [{"role": role, "content": x}]
    return as_messages(record["prompt"], "user") + as_messages(record["completion"], "assistant")


def write_lm_data(path, settings: LmSettings) -> int:
    """Write the job's training records to `path` as chat messages; returns how many."""
    train, _ = load_lm_records(settings)
    write_text(path, "".join(json.dumps({"messages": messages_of(r)}) + "\n" for r in train))
    return len(train)


def main(argv: list[str] | None = None) -> int:
    d = LmSettings()
    parser = argparse.ArgumentParser(prog="python -m deft_cli.demo.lm_data", description=__doc__.splitlines()[0])
    parser.add_argument("out", metavar="OUT.jsonl")
    parser.add_argument("--data", metavar="FILE.jsonl", help='{"prompt": ..., "completion": ...} lines (default: the '
                        "IMDB reviews as review requests)")
    parser.add_argument("--train-size", type=int, default=d.train_size, help=f"default {d.train_size}")
    parser.add_argument("--eval-size", type=int, default=d.eval_size, help=f"default {d.eval_size}")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    args = parser.parse_args(argv)
    settings = LmSettings(data=args.data, train_size=args.train_size, eval_size=args.eval_size, seed=args.seed)
    try:
        settings.check()
        count = write_lm_data(args.out, settings)
    except DeftError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {count} training records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
