"""The results store's former place: it is now :mod:`mdmt.store`, beside the run contract and below train,
experiments and evaluate (so that the report can read results without a package import cycle). These names
stay importable from here until every importer uses ``mdmt.store``."""

from mdmt.store import COLUMNS, FAILED_FILE, INDEX_FILE, STATUSES, ResultsStore, spec_fields

__all__ = ["COLUMNS", "FAILED_FILE", "INDEX_FILE", "STATUSES", "ResultsStore", "spec_fields"]
