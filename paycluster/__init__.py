"""The `paycluster` command line as installed: the lab's commands (cluster/) and the
benchmarks (bench/) in one tree. It sits above both layers, so neither imports the other
to appear in the CLI (see paycluster/cli.py)."""
