"""Triton kernels (installed as optimas_fast.kernels). Import only when a Triton backend is selected:
importing triton is slow and, on CPU, kernels run only under TRITON_INTERPRET=1."""
