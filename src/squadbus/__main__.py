"""``python -m squadbus`` runs the command line."""

from squadbus.cli.main import main

main(prog_name="squadbus")
