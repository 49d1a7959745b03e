"""Tools for development, the demo and tests, never imported by the product: the Whereby sandbox,
an embedded Redis, the process runner, and the harness that tests and the benchmark share."""
