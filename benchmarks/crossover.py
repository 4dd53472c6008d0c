"""Where the sparse MLP path stops paying: the crossover behind deft_common's MAX_ACTIVE_FRACTION.

The `mlp` rows of `deft bench --inference` (deft_cli.inference_bench.mlp_rows: Llama-2-7B's gated 4096 -> 11008
block and BERT-base's 768 -> 3072 one, batch 1, one token, fp32) with the sparse path forced on
(max_active_fraction=1) at densities up to 0.9: the density where `speedup` crosses 1 is where the fallback rule
should switch to the dense computation. From the repository root (a few minutes on 2 CPU cores):

    python benchmarks/crossover.py [--densities 0.2,0.3,0.5,0.7,0.9] [--rounds 7] [--backend auto]

Prints one row per block shape and density.
"""

from __future__ import annotations

import argparse

import torch

from deft_cli.inference_bench import mlp_rows

DENSITIES = (0.2, 0.3, 0.5, 0.7, 0.9)


def measure_crossover(densities=DENSITIES, rounds: int = 7, backend: str = "auto", tiny: bool = False) -> list[dict]:
    """The sparse path forced on (max_active_fraction=1) at each density (tiny=True: tiny shapes, in seconds)."""
    return mlp_rows(tiny, [torch.float32], densities, rounds, max_active_fraction=1.0, backend=backend)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backend", default="auto", help="install_sparse_mlp's backend (default auto)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: checks that it runs, measures nothing")
    args = parser.parse_args(argv)
    for row in measure_crossover(tuple(float(d) for d in args.densities.split(",")), args.rounds, args.backend,
                                 args.tiny):
        print(row)


if __name__ == "__main__":
    main()
