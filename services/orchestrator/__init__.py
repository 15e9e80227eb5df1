"""prompt-orchestrator: a gRPC mesh for LLM prompt pipelines."""
