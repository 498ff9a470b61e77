"""ImageNet -> WebDataset shards (see docs/FORMAT.md, and `python -m shards --help` for the commands)."""
