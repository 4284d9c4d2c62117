"""The lab: everything that measures or reports (bench, accuracy, studies, sweep, report, plots).

Nothing in the pipeline itself (teacher, cache, student, evaluation) imports this package; a test pins
that from the import graph, so the core stays usable without the lab.
"""
