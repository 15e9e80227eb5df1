"""The benchmark behind `make bench`: the mesh against floors measured in the same run; not part of the service."""
