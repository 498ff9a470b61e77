"""ImageNet -> WebDataset shards (see docs/FORMAT.md, and `python -m shards --help` for the commands)."""
MANIFEST = "manifest.json"  # in DATA: classes, shards with their sha256, rejected inputs, statistics
STATS = "stats.npz"  # in DATA: mean image, RGB mean and PCA of the training set
