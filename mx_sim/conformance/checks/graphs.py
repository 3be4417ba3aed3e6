"""Conformance checks: graphs.*"""
