"""haiku's own BatchNorm tests, run with jbn's class in haiku's place (tests/test_haiku_conformance.py)."""
