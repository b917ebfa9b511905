"""``python -m semantic_server`` runs the CLI."""

from semantic_server.cli import main

main()
