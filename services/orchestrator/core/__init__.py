"""The bottom layer: what every other layer shares (config, the stage graph, the call seam, errors, telemetry)."""
