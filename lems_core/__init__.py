"""LEMS Explorer core: SVD compression of causal LMs and global rank allocation.

Data flow, one module per step:
model -> calibration -> statistics -> decompositions/ -> sensitivity -> profile
-> error_model + budget -> allocators/ (+ solver) -> plan -> compression -> evaluation.
"""
__version__ = "0.1.0"

import os as _os

# OpenMP worker threads that spin while they wait hold a core that another process needs: on a
# shared 2-core machine a 2-thread statistics pass ran 4x slower with spinning (libgomp's default)
# than with passive waiting (docs/benchmarks.md, "Threads on a shared machine"). It must be set
# before torch loads its OpenMP runtime, so here; a value the user set wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
