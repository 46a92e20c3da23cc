"""Checks run from the command line whose outputs are README tables: planning at real scale on paper,
without allocating (``scale``), and the fault report of bad inputs and injected faults (``reliability``).
"""
