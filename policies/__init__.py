"""Shipped routing policies (`default.yaml`) and their test cases, as package data."""
