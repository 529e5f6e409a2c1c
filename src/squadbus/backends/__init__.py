"""Backends, one per module or package, each importing only ``squadbus.core``."""
