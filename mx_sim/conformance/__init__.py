"""Conformance suite for engine adapters (a pytest plugin, registered as ``mx_conformance``)."""
