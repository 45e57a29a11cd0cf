"""Experiments that test what the literature claims about batch norm, with jbn.

Run one with `python -m experiments run configs/NAME.yaml`; list them with
`python -m experiments list`. The report is experiments/README.md.
"""
