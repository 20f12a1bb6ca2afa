"""Allows ``python -m lynxsim``."""

from lynxsim.cli import console_main

raise SystemExit(console_main())
