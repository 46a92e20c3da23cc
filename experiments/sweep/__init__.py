"""Many runs: budget sweeps over methods x budgets x models x seeds (``sweep``), the strict reading of their
YAML specs (``specfile``, shared with ``experiments.tune``), the results store (``results``) and the Pareto
report built from it (``report``).
"""
