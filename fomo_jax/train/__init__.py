"""Losses, optimizer and the jitted train step."""
