"""One run: its typed config (``config``), THE training loop (``train``), atomic checkpoints (``checkpoint``)
and the same run on several processes under TorchRec's DistributedModelParallel (``distributed``).

Every stage, runner and distributed rank trains through :func:`experiments.training.train.train_epochs`.
The package imports nothing itself (``import experiments`` stays free of torch); import the modules.
"""
