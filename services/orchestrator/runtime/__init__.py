"""The shared stage runtime: server bootstrap, admission, downstream calls, telemetry hooks."""
