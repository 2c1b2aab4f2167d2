"""The click command group (commands are registered in `pipeline/cli/__init__.py`). Commands only parse options and call the library; a UserError
becomes one line on stderr and exit code 2, any other exception one line and exit code 1
(`--debug` or FEATURECACHE_DEBUG=1 shows the traceback), Ctrl-C exit code 130."""

from __future__ import annotations

import os
import sys
import traceback
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter off the terminal

import click

from pipeline.errors import DataWarning, UncleanFileError, UserError, filesystem_message
from pipeline.cli import quiet
from pipeline.cli.interrupts import resume_hint
from pipeline.quiet_fd import NativeChatter

quiet.install()

_show_warning = warnings.showwarning


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """DataWarnings are for the user: one `warning: ...` line, no source location."""
    if issubclass(category, DataWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


warnings.showwarning = one_line_warning


def debug_enabled(ctx: click.Context | None = None) -> bool:
    """Whether tracebacks are wanted: the group's --debug flag or FEATURECACHE_DEBUG=1."""
    if os.environ.get("FEATURECACHE_DEBUG", "").strip() not in ("", "0"):
        return True
    return bool(ctx is not None and ctx.find_root().params.get("debug"))


_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _Group(click.Group):
    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """click's own main, but a usage error (bad option value, unknown command) is one line too."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except _NO_ARGS_IS_HELP as exc:  # a group run with nothing: its help, as click prints it
            click.echo(exc.ctx.get_help(), err=True)
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
            click.echo(f"error: {' '.join(exc.format_message().split())}{where}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            with NativeChatter():  # decoder warnings about damaged images: one summary line, not one each
                return super().invoke(ctx)
        except UserError as exc:
            if debug_enabled(ctx):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo(f"interrupted: {resume_hint(ctx)}", err=True)
            sys.exit(130)
        except BrokenPipeError:  # e.g. `cli.py runs | head -1`: the reader has gone, which is no error
            try:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flushing the dead pipe at exit must not fail
            except OSError:
                pass
            sys.exit(0)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence against a raw traceback
            if debug_enabled(ctx):
                traceback.print_exc()
            cause = exc if filesystem_message(exc) else exc.__cause__
            if filesystem_message(cause):  # disk full, read-only, not a folder, no permission: say what to do
                click.echo(f"error: {filesystem_message(cause)}", err=True)
                if isinstance(cause, UncleanFileError):  # HDF5 would crash at shutdown: leave without it
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(2)
                sys.exit(2)
            message = " ".join(str(exc).split()) or "(no message)"
            if len(message) > 300:
                message = message[:297] + "..."
            hint = "" if debug_enabled(ctx) else " (python cli.py --debug ... or FEATURECACHE_DEBUG=1 shows the traceback)"
            click.echo(f"error: {type(exc).__name__}: {message}{hint}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show the full traceback of an error (or set FEATURECACHE_DEBUG=1).")
def cli(debug: bool) -> None:
    """Transfer learning with cached backbone features: extract once, fit heads in seconds."""
