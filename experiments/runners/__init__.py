"""How a sweep cell runs a multi-stage pipeline that a method declares (``sweep_runners``); the stages
themselves run through :mod:`experiments.training.stages`, on the one training loop.
"""
