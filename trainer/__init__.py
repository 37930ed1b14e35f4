"""Trainer: on-site domain adaptation, one module per method in `methods/` (DAAM, DAAL) around a shared loop, and ONNX export."""
