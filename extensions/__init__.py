"""Easel's extension framework: manifest, per-extension API, hooks, loader, installer.

Built-in extensions live in `extensions/builtin/`; user extensions in `<data_dir>/extensions/`.
See extensions/README.md for the API an extension may use.
"""
