"""LEMS Explorer core: SVD compression of causal LMs and global rank allocation.

Data flow, one module per step:
model -> calibration -> statistics -> decompositions/ -> sensitivity -> profile
-> error_model + budget -> allocators/ (+ solver) -> plan -> compression -> evaluation.
"""
__version__ = "0.1.0"
