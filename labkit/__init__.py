"""labkit: helpers for the LLM inference performance labs.

``import labkit`` is cheap: it imports no engine, no vLLM, no torchao and starts no Redis.
"""

import os as _os

__version__ = "0.1.0"

# torch's OpenMP worker threads spin while waiting; on a small shared CPU (2 cores, a lab
# machine) that makes every forward pass 10-20x slower. Sleeping waits cost nothing measurable.
# Only effective when labkit is imported before torch, as the notebooks do.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
