"""Every MongoDB driver call lives in this package (motor today; PyMongo's async client tomorrow)."""
from bookshop.storage.mongo import Database, is_unavailable  # noqa: F401
