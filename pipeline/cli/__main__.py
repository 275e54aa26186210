"""``python -m pipeline.cli``: same as the ``pipeline`` console script."""

from __future__ import annotations

from pipeline.cli.entry import main

main()
