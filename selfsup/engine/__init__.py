"""The one training loop and what it is made of: the method contract, optimisers, schedules,
checkpoints, the training stage's run over its methods.

A layer of ``selfsup``: it imports only itself and the layers before it in ``selfsup.LAYERS``."""
