"""Fixtures of the integration tests: the chest radiograph in every accepted transfer syntax."""

from tests.syntaxes import syntax_variants

__all__ = ["syntax_variants"]
