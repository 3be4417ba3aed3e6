"""Conformance checks: discovery.*"""
