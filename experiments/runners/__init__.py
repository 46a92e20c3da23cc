"""Multi-stage pipelines built on the one training loop: OptEmbed's supernet -> search -> retrain
(``optembed``), train -> SVD compress -> fine-tune (``low_rank_svd``), and the registry through which a
sweep cell runs them (``sweep_runners``).
"""
