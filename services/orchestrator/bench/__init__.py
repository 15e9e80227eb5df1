"""Load generation and benchmarks of the mesh against floors measured in the same run."""
