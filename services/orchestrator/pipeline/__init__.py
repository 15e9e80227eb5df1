"""Stage logic as async generators over typed messages, independent of gRPC."""
