"""Benchmark harness used by ``bench/`` scripts and ``squadbus bench``.

Numbers are measured in the run that prints them; every squadbus figure is
printed beside the raw client doing the same work in the same run.
"""
