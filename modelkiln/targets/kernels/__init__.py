"""GPU kernels of modelkiln's own, as torch custom ops that ``torch.export`` keeps in a
program: ``int4.py`` (``modelkiln::int4_mm``, a W4A16 product on compressed-tensors'
stored int4 weights) and its Triton kernels, ``int4_triton.py``."""
