"""Benchmarks for sofo: SOFO against Adam (BPTT), SGD with momentum, forward gradient descent and the
exact Gauss-Newton step on ill-conditioned regression, three RNN tasks and digits.

Run `python -m benchmarks --quick` (needs `pip install -e ".[bench]"`). Modules:

  tasks       the problems (data generated in code or shipped by scikit-learn)
  optimizers  the optimizers, as pure steps over a problem
  suite       timed training over learning-rate grids; comparisons against Adam
  report      markdown tables and PNG figures
  cli         the command line (`python -m benchmarks`)

Importing this package imports nothing heavy, so a missing extra is reported cleanly by the CLI.
"""
