"""Thin HTTP handlers: parse and validate input, call the shop, write JSON."""
