"""Memory banks: per-patch soft labels and patch sampling, the on-disk bank format (one writer,
sharded, atomic, resumable) and the builder that fills a bank from a dataset and a feature extractor.
"""
