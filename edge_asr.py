"""``edge-asr``: the console entry point, above the three layers it drives.

``asr_core`` (train, evaluate, transcribe, ...), ``compression`` (compress, benchmark, sensitivity, export) and
the app (serve) each add their own subcommands; this module parses, sets torch's threads once from the command's
``--threads``, runs the handler and turns every error into one line on stderr with a non-zero exit (``--debug``
shows the traceback). ``python -m edge_asr`` and ``python -m asr_core`` are the same command.
"""
from __future__ import annotations

import argparse
import sys

from asr_core import cli as core_cli
from asr_core.errors import EdgeASRError, SettingsError
from compression import cli as compression_cli

EXIT_ERROR, EXIT_INTERRUPTED = 2, 130


def cmd_serve(args) -> int:
    from app import main as serve  # gradio loads only for this command

    return serve(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-asr", description="Conformer-CTC speech recognition and compression.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    core_cli.add_subcommands(sub)
    compression_cli.add_subcommands(sub)
    p = sub.add_parser("serve", help="start the Gradio studio (see `edge-asr serve --help`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(handler=cmd_serve, threads=None)
    return parser


def flag_for(err: SettingsError, parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The command-line flag of the setting an error names (``freeze_layers`` -> ``--freeze-layers``), when the
    subcommand has one."""
    if not getattr(err, "setting", None):
        return None
    flag = "--" + err.setting.replace("_", "-")
    subparsers = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    command = subparsers.choices.get(argv[0]) if subparsers and argv else None
    return flag if command is not None and flag in command._option_string_actions else None


def _message(err: BaseException, parser, argv) -> str:
    if isinstance(err, SettingsError):
        flag = flag_for(err, parser, [a for a in argv if not a.startswith("--debug")])
        if flag and flag not in str(err):
            return f"{flag}: {err}"
    if isinstance(err, (EdgeASRError, ValueError, OSError)):
        return str(err)
    return f"internal error ({type(err).__name__}: {err}); run with --debug for the traceback"


# Subcommands that parse their own flags (argparse's REMAINDER would not pass a leading --help on)
PASS_THROUGH = ("serve", "listen")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    debug = bool(argv) and argv[0] == "--debug"
    command = argv[1:] if debug else argv
    if command and command[0] in PASS_THROUGH:
        args = argparse.Namespace(debug=debug, threads=None, rest=command[1:],
                                  handler=cmd_serve if command[0] == "serve" else core_cli.cmd_listen)
    else:
        args = parser.parse_args(argv)
    try:
        core_cli.set_threads(getattr(args, "threads", None))
        return args.handler(args)
    except KeyboardInterrupt:
        print("edge-asr: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 -- the one place every error becomes a line for a person
        if args.debug:
            raise
        print(f"edge-asr: error: {_message(err, parser, argv)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
