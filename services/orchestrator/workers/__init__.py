"""Model workers: the pluggable token generators behind the inference stage."""
