"""reled-hpc: distributed MARL for city-scale vehicle navigation with LLM-written expert demonstrations."""

__version__ = "0.1.0"
