"""Bookshop: an online bookshop built as real-time Tornado microservices."""

__version__ = "0.1.0"

#: service name -> port offset from BOOKSHOP_PORT_BASE (the contract's table)
SERVICES = {
    "gateway": 0,
    "users": 1,
    "catalog": 2,
    "inventory": 3,
    "orders": 4,
    "payments": 5,
    "recommendations": 6,
}
