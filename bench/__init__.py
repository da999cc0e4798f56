"""Benchmarks that compare Tandem with a reference runtime on this machine (`python -m bench.<name>`)."""
