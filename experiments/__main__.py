"""`python -m experiments run configs/NAME.yaml [--override key=value ...]` and `python -m experiments list`."""

from experiments.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
