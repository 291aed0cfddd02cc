"""Easel's version, written into every infotext as `Version: easel-x.y.z`."""
VERSION = "0.1.0"
INFOTEXT_VERSION = f"easel-{VERSION}"
