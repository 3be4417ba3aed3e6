"""Conformance checks: refit.*"""
