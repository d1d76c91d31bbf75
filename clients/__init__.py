"""Clients of the fewstep server."""
