"""Side-by-side benchmarks of the project against the paths a user would otherwise run (``make bench``).

Every benchmark runs the project's path and its peer's path in one process, on the same data, threads and
precision, in alternating repetitions, and reports each side's median and spread and their ratio.
"""
