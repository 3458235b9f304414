"""DecodeBench: a reproducible benchmark harness for LLM decoding acceleration."""

__version__ = "0.1.0"
