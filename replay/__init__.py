"""Offline tools over krmx-lobby event logs."""
