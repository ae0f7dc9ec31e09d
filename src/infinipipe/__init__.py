"""InfiniPipe: elastic pipeline parallelism for variable-length long-context LLM training."""

__version__ = "0.1.0"
