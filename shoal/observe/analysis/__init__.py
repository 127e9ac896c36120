"""Analyzers: why the mesh does what it does, traced to the object at fault.

Each analyzer is a pure function from `facts.Facts` (the mesh state, the
problems its sources found, and, against a running control plane, what its
proxies hold and report) to problems with a catalogue code
(`model.problems.CODES`). `run.analyze` runs them all; `gather` collects
the facts of a running control plane.
"""
