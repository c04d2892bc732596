"""Thin click CLI: each command lives in its own module and only parses, calls the library and prints."""
