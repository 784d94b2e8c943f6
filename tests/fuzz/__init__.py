"""Property-based fuzz suite (issue #7): generated hostile requests against one real server process.

A package so that its conftest.py does not shadow tests/conftest.py (which the tests import as `conftest`).
"""
