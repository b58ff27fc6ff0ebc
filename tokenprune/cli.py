"""The ``tokenprune`` command: ``tokenprune eval``, ``tokenprune bench llm``, ``tokenprune methods``, ``tokenprune models``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="tokenprune", description="Token pruning for transformers models.")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("eval", help="quality / fidelity / cost of methods x budgets vs dense, with plots "
                   "(see `tokenprune eval --help`)", add_help=False)
    sub.add_parser("bench", help="speed benchmarks (see `tokenprune bench --help`)", add_help=False)
    sub.add_parser("methods", help="list registered pruning methods")
    sub.add_parser("models", help="list bundled offline models (tp.zoo)")
    args, rest = ap.parse_known_args(argv)
    if args.command == "eval":
        from .evals.runner import main as run_eval

        return run_eval(rest, prog="tokenprune eval")
    if args.command == "bench":
        from .evals.bench import main as bench

        return bench(rest)
    import tokenprune as tp

    names = tp.list_pruners() if args.command == "methods" else tp.zoo.names()
    print("\n".join(names))


if __name__ == "__main__":
    main()
