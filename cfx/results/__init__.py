"""Counterfactual run results: the resumable HDF5 store and its lazy reader (``open_results``)."""

from cfx.results.store import STORE_FILENAME, Results, StoreWriter, merge_stores, open_results

__all__ = ["STORE_FILENAME", "Results", "StoreWriter", "merge_stores", "open_results"]
