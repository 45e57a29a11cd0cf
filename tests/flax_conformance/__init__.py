"""flax's own BatchNorm tests run against jbn: the runner (download, extract, two passes),
the pytest plugin that swaps jbn's classes in (`jbn_swap`), and the selection rule
(`jbn_select`). Used by tests/test_flax_conformance.py."""
