"""One run: its typed config (``config``), THE training loop (``train``), atomic checkpoints (``checkpoint``),
the same run on several processes under TorchRec's DistributedModelParallel (``distributed``), and the
stages a method declares (``stages``: run, checkpointed and resumed through the same loop).

Every stage, runner and distributed rank trains through :func:`experiments.training.train.train_epochs`.
The package imports nothing itself (``import experiments`` stays free of torch); import the modules.
"""
