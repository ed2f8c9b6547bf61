"""What every token of the shop says about itself: who issued it, for whom, how it is signed, the roles.

The users service signs with these (``services.accounts``), every service verifies with them (``auth``)."""
from __future__ import annotations

ISSUER = "bookshop-users"
AUDIENCE = "bookshop"
ALGORITHM = "RS256"
ROLES = ("customer", "staff", "service")
