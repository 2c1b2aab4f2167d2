"""The command line: the group (`group.py`: one-line errors, exit codes 2, 1 and 130) and the commands,
one module per command group, registered from the one list below (the command modules never import
the group, so arrows only go down)."""

from __future__ import annotations

import os
import sys

from pipeline.cli.group import cli  # first: it quiets TensorFlow's start-up before anything imports it
from pipeline.cli import (audit_cmds, cache_cmds, export_cmds, extract_cmds, finetune_cmds, head_cmds, predict_cmds,
                          runs_cmds)

COMMANDS = (extract_cmds.extract_cmd, extract_cmds.backbones_cmd, head_cmds.fit_head_cmd, finetune_cmds.finetune_cmd,
            predict_cmds.predict_cmd, predict_cmds.evaluate_cmd, export_cmds.export_cmd, audit_cmds.audit_cmd,
            runs_cmds.runs_group, cache_cmds.cache_group)
for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    """`python cli.py ...`, or the `featurecache` command that `pip install` puts on the PATH."""
    script = os.path.basename(sys.argv[0] or "")
    cli(prog_name="cli.py" if script.endswith(".py") or not script else script)
