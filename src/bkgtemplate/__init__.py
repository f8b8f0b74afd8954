"""Template background models for IACT data with gammapy 2.x."""
