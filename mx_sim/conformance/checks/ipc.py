"""Conformance checks: ipc.*"""
