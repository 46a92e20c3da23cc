"""Searches with Optuna: one (method, budget, model) study (``tune``) over a method's declared search space
(``search_space``) in a storage several workers share (``study_storage``), and ``embtable advise``: which
method, with which knobs, for a dataset at a budget (``advise``).
"""
