"""Triton GPU kernels. Importing this package does not import triton: ``backend`` registers the
"triton" dispatch backend lazily, ``group_norm`` holds the kernels (needs ``groupnorm[triton]``)."""
