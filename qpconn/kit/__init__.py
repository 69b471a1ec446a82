"""Helpers for plugin authors: option parsing, address and network lists, DNS, block lists, PSL."""
