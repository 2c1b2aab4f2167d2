#!/usr/bin/env python
"""Command-line entry point: `python cli.py --help`. All logic lives in the `pipeline` package."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
