"""The ``squadbus`` command line."""
