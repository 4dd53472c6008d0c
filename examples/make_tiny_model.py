"""Write a tiny random model, its tokenizer and small datasets to a folder, for trying the examples offline on a CPU.

    python examples/make_tiny_model.py --family opt    # the Python examples' model (hf_trainer, trl_sft, deepspeed_loop)
    python examples/make_tiny_model.py                 # the default, a tiny Llama: the Axolotl example's model
    python examples/make_tiny_model.py DIR --family gpt2
    # each writes DIR (default /tmp/deft-tiny)/{model, alpaca.jsonl, text.jsonl}

The model is untrained (2 layers, hidden size 32): the examples run end to end in seconds, but the numbers they
print mean nothing. Point the examples at a real checkpoint for real results. The Python examples use `--family opt`
(ReLU: its exact zeros respond to the density loss within their 30 steps); the default stays llama, the model
examples/axolotl/deft_lora.yml is written for.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

# The tiny models and data are the ones the integration tests use.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "integration_tests"))

from fixtures import DECODER_ONLY, FAMILIES, save_model_dir, write_alpaca_jsonl, write_text_jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="/tmp/deft-tiny", help="output folder (default: /tmp/deft-tiny)")
    parser.add_argument("--family", default="llama", choices=FAMILIES,
                        help="architecture (default: llama, for the Axolotl example; the Python examples use opt; "
                        "causal LMs: " + ", ".join(DECODER_ONLY) + ")")
    parser.add_argument("--rows", type=int, default=64, help="rows of each dataset (default: 64)")
    args = parser.parse_args(argv)
    folder = pathlib.Path(args.folder)
    model_dir = save_model_dir(args.family, folder / "model")
    alpaca = write_alpaca_jsonl(folder / "alpaca.jsonl", args.rows)
    text = write_text_jsonl(folder / "text.jsonl", args.rows)
    print(f"model and tokenizer: {model_dir}\ndatasets: {alpaca} (instruction/input/output), {text} (text)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
