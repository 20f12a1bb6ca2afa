"""Allows ``python -m lynxsim``."""

from lynxsim.cli import main

raise SystemExit(main())
