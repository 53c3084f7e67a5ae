"""Helpers the tests share: databases, servers, subprocess clients."""
