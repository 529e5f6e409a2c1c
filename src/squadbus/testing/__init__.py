"""Test helpers shipped with the package: the conformance suite and real-server fixtures."""
