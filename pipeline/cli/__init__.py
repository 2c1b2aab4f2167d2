"""The click command group. Commands only parse options and call the library; a UserError
becomes one line on stderr and exit code 2, Ctrl-C exit code 130, never a traceback."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter off the terminal

import click

from pipeline.errors import UserError
from pipeline.cli import quiet

quiet.install()


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished chunks are kept; run the same command again to resume", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli() -> None:
    """Transfer learning with cached backbone features: extract once, fit heads in seconds."""


from pipeline.cli import cache_cmds, extract_cmds, finetune_cmds, head_cmds, predict_cmds  # noqa: E402,F401  (register commands)


def main() -> None:
    cli(prog_name="cli.py")
