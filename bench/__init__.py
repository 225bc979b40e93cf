"""Benchmarks for the Hogwild! engine (``python -m bench engine --help``)."""
