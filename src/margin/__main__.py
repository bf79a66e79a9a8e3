"""`python -m margin`."""

from margin.cli.main import app

app()
