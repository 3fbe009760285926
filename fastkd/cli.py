"""The ``fastkd`` console script. ``fastkd bench [options]`` runs the benchmark suite; ``fastkd audit
[options]`` compiles the kernels for a GPU (none needed) and reports what the compiler produced;
``fastkd --version``.

The command line is parsed first, from modules that import nothing heavy (``fastkd.bench.arguments``,
``fastkd.audit.command``); a subcommand's own module, and torch with it, is imported only when it
runs, so ``--help`` and ``--version`` answer at once.
"""
import argparse
import sys

from . import __version__


def build_parser():
    from .audit import command as audit_command
    from .bench import arguments as bench_arguments

    parser = argparse.ArgumentParser(prog="fastkd", description="fastkd: fused knowledge-distillation losses")
    parser.add_argument("--version", action="version", version=f"fastkd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser("bench", help="benchmark fastkd against torch eager, torch.compile and Liger",
                                description=bench_arguments.build_parser().description)
    bench_arguments.add_arguments(bench)
    audit = commands.add_parser("audit", help="compile the kernels for sm_90 (no GPU needed): registers, spills, "
                                "load widths, bytes and SASS work per element, a modelled H200 time",
                                description=audit_command.build_parser().description)
    audit_command.add_arguments(audit)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "audit":
        from .audit import command
    else:
        from .bench import command
    return command.run(args)


if __name__ == "__main__":
    sys.exit(main())
