"""A1111 prompt language on diffusers: extra-network tags, grammar, schedules, encoding, styles."""
