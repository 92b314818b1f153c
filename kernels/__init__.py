"""Kernel backends, one module each, all implementing the contract in ``_contract.py``.

Installed as ``fastcnn.kernels``. Layers never import these modules directly: they ask
``fastcnn.backend.kernels()`` for the active one.
"""
