"""The ``fastkd`` console script. ``fastkd bench [options]`` runs the benchmark suite."""
import argparse
import sys


def main(argv=None):
    from .bench import command

    parser = argparse.ArgumentParser(prog="fastkd", description="fastkd: fused knowledge-distillation losses")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser("bench", help="benchmark fastkd against torch eager, torch.compile and Liger",
                                description=command.build_parser().description)
    command.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return command.run(args)


if __name__ == "__main__":
    sys.exit(main())
