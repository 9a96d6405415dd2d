"""The fedmpq coordinator: registry, rounds, deadlines, de-quantized aggregation, metrics."""
