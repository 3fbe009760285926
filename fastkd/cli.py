"""The ``fastkd`` console script. ``fastkd bench [options]`` runs the benchmark suite; ``fastkd audit
[options]`` compiles the kernels for a GPU (none needed) and reports what the compiler produced."""
import argparse
import sys


def main(argv=None):
    from .audit import command as audit_command
    from .bench import command

    parser = argparse.ArgumentParser(prog="fastkd", description="fastkd: fused knowledge-distillation losses")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser("bench", help="benchmark fastkd against torch eager, torch.compile and Liger",
                                description=command.build_parser().description)
    command.add_arguments(bench)
    audit = commands.add_parser("audit", help="compile the kernels for sm_90 (no GPU needed): registers, spills, "
                                "load widths, bytes and SASS work per element, a modelled H200 time",
                                description=audit_command.build_parser().description)
    audit_command.add_arguments(audit)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return (audit_command if args.command == "audit" else command).run(args)


if __name__ == "__main__":
    sys.exit(main())
