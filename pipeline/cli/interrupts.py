"""What Ctrl-C leaves behind, said in the group's one 'interrupted:' line: a default per command, or
what the running command set once it knew more (the run's ID, say)."""

from __future__ import annotations

import click

RESUME_HINTS = {  # what Ctrl-C leaves, per command
    "extract": "finished chunks are kept; run the same command again to resume",
    "fit-head": "finished extraction chunks are kept; run the same command again to resume",
    "finetune": "the last finished epoch is checkpointed; `cli.py runs --stage finetune` shows the run, "
                "`cli.py finetune --resume ID` continues it",
}

_HINT_KEY = "featurecache.resume_hint"


def set_resume_hint(text: str) -> None:
    """What Ctrl-C from here on leaves, said by the command that knows it."""
    click.get_current_context().meta[_HINT_KEY] = text


def resume_hint(ctx: click.Context) -> str:
    """The hint the running command set, else its command's default."""
    return ctx.meta.get(_HINT_KEY) or RESUME_HINTS.get(ctx.invoked_subcommand or "", "stopped; run the command again")
