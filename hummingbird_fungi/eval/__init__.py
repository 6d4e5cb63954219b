"""Evaluation drivers: the Hummingbird protocol (memory bank, retrieval, metrics) behind
`evaluate` and `hbird_evaluation`, the streaming mIoU metrics, and image-level kNN classification.
"""
