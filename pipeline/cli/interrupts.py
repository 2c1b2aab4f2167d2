"""What Ctrl-C leaves behind, said in the group's one 'interrupted:' line: a default per command, or
what the running command set once it knew more (the run's ID, say)."""

from __future__ import annotations

from typing import Callable

import click

RESUME_HINTS = {  # what Ctrl-C leaves, per command
    "extract": "finished chunks are kept; run the same command again to resume",
    "fit-head": "finished extraction chunks are kept; run the same command again to resume",
    # before its run is made (reading or extracting the head's features): nothing was trained
    "finetune": "nothing was trained yet (finished extraction chunks are kept); run the same command again",
    "audit": "finished extraction chunks are kept; run the same command again",
}

_HINT_KEY = "featurecache.resume_hint"


def set_resume_hint(text: str | Callable[[], str]) -> None:
    """What Ctrl-C from here on leaves, said by the command that knows it (a callable: worked out when
    Ctrl-C comes, e.g. whether an epoch was checkpointed by then)."""
    click.get_current_context().meta[_HINT_KEY] = text


def resume_hint(ctx: click.Context) -> str:
    """The hint the running command set, else its command's default."""
    hint = ctx.meta.get(_HINT_KEY)
    if callable(hint):
        hint = hint()
    return hint or RESUME_HINTS.get(ctx.invoked_subcommand or "", "stopped; run the command again")
