"""Trainer: on-site domain adaptation (DAAM/DAAL) and ONNX export."""
