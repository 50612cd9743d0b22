"""The one training loop and what it is made of: the method contract, optimisers, schedules, checkpoints, the pretrain stage's run over every method.

Layer 6 of ``selfsup`` (see ``selfsup/__init__.py``): it imports only the layers below it."""
