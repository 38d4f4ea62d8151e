"""`python -m edge_agent` runs the CLI."""

from edge_agent.cli import main

raise SystemExit(main())
