"""labkit: helpers for the LLM inference performance labs.

``import labkit`` is cheap: it imports no engine, no vLLM, no torchao and starts no Redis.
"""

__version__ = "0.1.0"
