"""Retrieval: nearest-neighbour indexes behind one interface (exact torch, faiss flat, IVF-PQ, HNSW,
ScaNN) and the label transfer that turns a patch's neighbours into a class distribution.
"""
