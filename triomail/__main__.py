"""``python -m triomail``: the same as the ``triomail`` command."""

from ._cli import main

raise SystemExit(main())
