"""selfsup: the algorithms behind the DVC pipeline (see README.md). Every module is a set of
pure functions and small classes with an explicit seed and device; stages/ holds the thin
scripts that DVC runs.

The package is layered. Each subpackage imports only itself and the subpackages listed before
it in ``LAYERS``. That holds for every import, also one inside a function.
``tests/test_layers.py`` reads the imports and keeps the rule true:

- ``core``: the config engine, I/O and hashing, distributed helpers, launch, stage plumbing,
  tracking.
- ``augment``: batched device augmentation, patch masks, colour spaces.
- ``data``: sources, the prepared format, loaders, training batches.
- ``models``: backbones, heads, momentum targets, the memory bank, prototypes, tokenisers,
  feature extraction.
- ``losses``: one file per family.
- ``cluster``: k-means, PCA, Sinkhorn, samplers, clustering metrics.
- ``engine``: the method contract, optimisers, schedules, the loop, the training stage's run.
- ``methods``: one file per method, found by name.
- ``eval``: kNN, the linear probes, fine-tuning, the evaluate stage's loop.
- ``detection``: VOC transfer.
- ``report``: tables and plots.

The top-level modules are the commands (``python -m selfsup.config | dag | presets``). They may
import anything, and no layer imports them.
"""

__version__ = "0.1.0"

LAYERS = ("core", "augment", "data", "models", "losses", "cluster", "engine", "methods", "eval", "detection",
          "report")
