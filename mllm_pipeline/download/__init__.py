"""Downloading media: URL policy, media verification, and the img2dataset / video2dataset adapters."""
